package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/smqtt/smqtt/internal/mosquitto"
	"github.com/smqtt/smqtt/internal/syncbuf"
)

// TestReadmeDeploymentRecipe runs the README's "A real deployment in ten
// minutes" as a new user would: its shell commands, line by line, and its
// configuration files, as the README has them (only the port numbers are
// moved to free ones, consistently). It checks what the README says the
// user sees: app B reads the message app A sent, in clear, through its
// sidecar; the broker carries only ciphertext; /healthz answers ok.
func TestReadmeDeploymentRecipe(t *testing.T) {
	for _, bin := range []string{"mosquitto_sub", "mosquitto_pub", "curl"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("the recipe needs %s: %v", bin, err)
		}
	}
	mosq, ok := mosquitto.Available()
	if !ok {
		t.Skip("mosquitto not installed")
	}
	raw, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := recipeBlocks(t, string(raw), "## A real deployment in ten minutes")
	ports := movePorts(t, blocks)

	dir := t.TempDir()
	env := append(os.Environ(), "PATH="+filepath.Dir(mosq)+string(os.PathListSeparator)+os.Getenv("PATH"))
	var bg []*recipeProc
	t.Cleanup(func() {
		for _, p := range bg {
			p.stop()
		}
		if t.Failed() {
			for _, p := range bg {
				t.Logf("$ %s\n%s", p.line, p.out.String())
			}
		}
	})
	var curlOut string
	for _, b := range blocks {
		if b.lang == "yaml" {
			if err := os.WriteFile(filepath.Join(dir, b.file), []byte(b.text), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		for _, line := range strings.Split(b.text, "\n") {
			line = strings.TrimSpace(shellComment.ReplaceAllString(line, ""))
			switch {
			case line == "":
				continue
			case strings.HasPrefix(line, "go build"):
				// The binary TestMain built from this tree, where the recipe says.
				if line != "go build -o smqtt ./cmd/smqtt" {
					t.Fatalf("the recipe builds with %q; teach this test", line)
				}
				copyFile(t, smqttBin, filepath.Join(dir, "smqtt"))
				continue
			}
			p := startRecipeLine(t, dir, env, line)
			if !p.background {
				if err := p.wait(30 * time.Second); err != nil {
					t.Fatalf("$ %s: %v\n%s", line, err, p.out.String())
				}
				if strings.HasPrefix(line, "curl") {
					curlOut = p.out.String()
				}
				continue
			}
			bg = append(bg, p)
			waitReady(t, dir, p, ports.broker)
		}
	}

	// What the README promises.
	var plain, broker *recipeProc
	for _, p := range bg {
		if strings.HasPrefix(p.line, "mosquitto_sub") {
			if strings.Contains(p.line, fmt.Sprintf("-p %d ", ports.broker)) {
				broker = p
			} else {
				plain = p
			}
		}
	}
	if plain == nil || broker == nil {
		t.Fatal("the recipe no longer subscribes both through a sidecar and on the broker")
	}
	waitUntil(t, 10*time.Second, func() bool { return strings.Contains(plain.out.String(), "secure/hello hello") },
		"app B reads secure/hello in clear through its sidecar")
	waitUntil(t, 10*time.Second, func() bool { return strings.Contains(broker.out.String(), "secure/hello ") },
		"the broker carries secure/hello")
	for _, l := range strings.Split(broker.out.String(), "\n") {
		if payload, ok := strings.CutPrefix(l, "secure/hello "); ok && strings.Contains(payload, "hello") {
			t.Fatalf("plaintext on the broker: %q", l)
		}
	}
	if strings.TrimSpace(curlOut) != "ok" {
		t.Fatalf("/healthz said %q, the README says ok", curlOut)
	}
	if m := mode(t, filepath.Join(dir, "data")); m != 0o700 {
		t.Fatalf("the key server created data/ with mode %o, want 700", m)
	}
}

// shellComment is a comment after a command: whitespace, then #.
var shellComment = regexp.MustCompile(`(^|\s+)#(\s.*)?$`)

type recipeBlock struct {
	lang, text string
	file       string // yaml: the file the text before the block names
}

// recipeBlocks returns the fenced code blocks of a README section; a yaml
// block is named by the last *.yaml file the prose before it mentions.
func recipeBlocks(t *testing.T, readme, heading string) []recipeBlock {
	t.Helper()
	_, section, ok := strings.Cut(readme, heading)
	if !ok {
		t.Fatalf("README has no section %q", heading)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	fileRE := regexp.MustCompile("`([a-z0-9-]+\\.yaml)`")
	var out []recipeBlock
	prose := ""
	for rest := section; ; {
		before, after, ok := strings.Cut(rest, "```")
		if !ok {
			break
		}
		prose += before
		lang, after, _ := strings.Cut(after, "\n")
		text, after, ok := strings.Cut(after, "```")
		if !ok {
			t.Fatal("README: unterminated code block")
		}
		b := recipeBlock{lang: lang, text: text}
		if lang == "yaml" {
			m := fileRE.FindAllStringSubmatch(prose, -1)
			if len(m) == 0 {
				t.Fatalf("README: no file named before the yaml block %q", text[:40])
			}
			b.file = m[len(m)-1][1]
		}
		out = append(out, b)
		prose, rest = "", after
	}
	if len(out) < 4 {
		t.Fatalf("README: %d code blocks in the recipe, want its commands and configurations", len(out))
	}
	return out
}

type recipePorts struct{ broker int }

// movePorts replaces every port number the recipe uses with a free one, in
// commands and configurations alike, and returns the broker's.
func movePorts(t *testing.T, blocks []recipeBlock) recipePorts {
	t.Helper()
	portRE := regexp.MustCompile(`(?:-p |127\.0\.0\.1:|s/\d+/)(\d{4,5})\b`)
	moved := map[string]string{}
	var all string
	for _, b := range blocks {
		all += b.text
	}
	for _, m := range portRE.FindAllStringSubmatch(all, -1) {
		if _, ok := moved[m[1]]; !ok {
			_, port, _ := strings.Cut(freeAddr(t), ":")
			moved[m[1]] = port
		}
	}
	var ports recipePorts
	for i := range blocks {
		for _, m := range regexp.MustCompile(`mosquitto -p (\d+)`).FindAllStringSubmatch(blocks[i].text, -1) {
			fmt.Sscan(moved[m[1]], &ports.broker)
		}
		blocks[i].text = wholeNumbers(blocks[i].text, moved)
	}
	if ports.broker == 0 {
		t.Fatal("the recipe starts no broker (mosquitto -p PORT)")
	}
	return ports
}

// wholeNumbers applies the port replacements to whole numbers only.
func wholeNumbers(s string, moved map[string]string) string {
	return regexp.MustCompile(`\b\d{4,5}\b`).ReplaceAllStringFunc(s, func(n string) string {
		if to, ok := moved[n]; ok {
			return to
		}
		return n
	})
}

// recipeProc is one command line of the recipe run by bash.
type recipeProc struct {
	line       string
	background bool
	cmd        *exec.Cmd
	out        syncbuf.Buffer
	done       chan error
}

func startRecipeLine(t *testing.T, dir string, env []string, line string) *recipeProc {
	t.Helper()
	p := &recipeProc{line: line, done: make(chan error, 1)}
	if s, ok := strings.CutSuffix(line, "&"); ok {
		p.background, line = true, strings.TrimSpace(s)
	}
	p.line = line
	p.cmd = exec.Command("bash", "-c", "exec "+line)
	p.cmd.Dir, p.cmd.Env = dir, env
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("$ %s: %v", line, err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	return p
}

func (p *recipeProc) wait(d time.Duration) error {
	select {
	case err := <-p.done:
		return err
	case <-time.After(d):
		p.stop()
		return fmt.Errorf("still running after %v", d)
	}
}

func (p *recipeProc) exited() bool {
	select {
	case err := <-p.done:
		p.done <- err
		return true
	default:
		return false
	}
}

func (p *recipeProc) stop() {
	if p.exited() {
		return
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	if p.wait(10*time.Second) != nil {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// waitReady waits until what a background line started can be used, as a
// user would before typing the next line.
func waitReady(t *testing.T, dir string, p *recipeProc, broker int) {
	t.Helper()
	fields := strings.Fields(p.line)
	switch {
	case fields[0] == "mosquitto":
		waitUntil(t, 10*time.Second, func() bool { return dial(fmt.Sprintf("127.0.0.1:%d", broker)) }, "mosquitto listens")
	case strings.Contains(p.line, "smqtt keyserver"):
		waitUntil(t, 20*time.Second, func() bool { return strings.Contains(p.out.String(), "key server started") }, "the key server starts")
	case strings.Contains(p.line, "smqtt sidecar"):
		var cfg struct {
			Sidecar struct {
				MetricsListen string `yaml:"metrics_listen"`
			}
		}
		b, err := os.ReadFile(filepath.Join(dir, fields[len(fields)-1]))
		if err == nil {
			err = yaml.Unmarshal(b, &cfg)
		}
		if err != nil || cfg.Sidecar.MetricsListen == "" {
			t.Fatalf("$ %s: no metrics_listen to wait on (%v)", p.line, err)
		}
		waitStatus(t, "http://"+cfg.Sidecar.MetricsListen+"/healthz", func(c int) bool { return c == http.StatusOK }, p.line+": healthy")
	default:
		time.Sleep(time.Second) // a subscriber: no sign when it has subscribed
	}
	if p.exited() {
		t.Fatalf("$ %s exited:\n%s", p.line, p.out.String())
	}
}

func dial(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		c.Close()
	}
	return err == nil
}

func waitUntil(t *testing.T, d time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: "+format, args...)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err == nil {
		err = os.WriteFile(to, b, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
}
