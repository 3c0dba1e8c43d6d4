package deploy

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, ...
	args string
}

func parseDockerfile(t *testing.T, path string) []instruction {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if rest, ok := strings.CutSuffix(trimmed, `\`); ok {
			cur.WriteString(rest + " ")
			continue
		}
		cur.WriteString(trimmed)
		cmd, args, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
		cur.Reset()
	}
	return out
}

// TestDockerfileBuildsAStaticBinaryForANonRootUser checks the recipe: a
// build stage that makes a static, trimmed binary stamped with its version
// (through a variable that exists), and a final stage on a static base that
// runs it as a non-root user.
func TestDockerfileBuildsAStaticBinaryForANonRootUser(t *testing.T) {
	ins := parseDockerfile(t, "Dockerfile")
	var stages [][]instruction
	for _, in := range ins {
		if in.cmd == "FROM" {
			stages = append(stages, nil)
		}
		if len(stages) > 0 {
			stages[len(stages)-1] = append(stages[len(stages)-1], in)
		}
	}
	if len(stages) < 2 {
		t.Fatalf("%d stages, want a build stage and a final one", len(stages))
	}

	t.Run("the build stage makes a static binary stamped with its version", func(t *testing.T) {
		var build string
		for _, st := range stages[:len(stages)-1] {
			for _, in := range st {
				if in.cmd == "RUN" && strings.Contains(in.args, "go build") {
					build = in.args
				}
			}
		}
		if build == "" {
			t.Fatal("no RUN ... go build in a build stage")
		}
		for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/smqtt", "-o /out/smqtt"} {
			if !strings.Contains(build, want) {
				t.Errorf("go build lacks %s: %s", want, build)
			}
		}
		m := regexp.MustCompile(`-ldflags "([^"]*)"`).FindStringSubmatch(build)
		if m == nil {
			t.Fatalf("go build has no -ldflags \"...\": %s", build)
		}
		flags := strings.Fields(m[1])
		for _, want := range []string{"-s", "-w", "-X"} {
			if !slices.Contains(flags, want) {
				t.Errorf("-ldflags lacks %s: %q", want, m[1])
			}
		}
		if !strings.Contains(m[1], "-X main.version=") {
			t.Errorf("-ldflags does not set main.version: %q", m[1])
		}
		src, err := os.ReadFile(filepath.Join("..", "cmd", "smqtt", "main.go"))
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(`(?m)^var version = ""`).Match(src) {
			t.Error(`cmd/smqtt has no "var version = \"\"" for -X main.version to set`)
		}
	})

	t.Run("the Go version matches go.mod", func(t *testing.T) {
		mod, err := os.ReadFile(filepath.Join("..", "go.mod"))
		if err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
		if m == nil {
			t.Fatal("go.mod has no go directive")
		}
		want := "GO_VERSION=" + string(m[1])
		found := false
		for _, in := range ins {
			if in.cmd == "ARG" && in.args == want {
				found = true
			}
		}
		if !found {
			t.Errorf("no ARG %s (go.mod says go %s)", want, m[1])
		}
	})

	t.Run("the final stage runs the binary as a non-root user on a static base", func(t *testing.T) {
		final := stages[len(stages)-1]
		base := strings.Fields(final[0].args)[0]
		if base != "scratch" && !strings.Contains(base, "distroless/static") {
			t.Errorf("final base %s, want scratch or distroless/static", base)
		}
		var user, entrypoint string
		copied := false
		for _, in := range final {
			switch in.cmd {
			case "USER":
				user = in.args
			case "ENTRYPOINT":
				entrypoint = in.args
			case "COPY":
				if strings.Contains(in.args, "/out/smqtt /smqtt") {
					copied = true
				}
			}
		}
		if !copied {
			t.Error("the final stage does not COPY /out/smqtt to /smqtt")
		}
		name, _, _ := strings.Cut(user, ":")
		if name == "" || name == "root" || name == "0" {
			t.Errorf("USER %q, want a non-root user", user)
		}
		var argv []string
		if err := json.Unmarshal([]byte(entrypoint), &argv); err != nil || len(argv) != 1 || argv[0] != "/smqtt" {
			t.Errorf(`ENTRYPOINT %s, want ["/smqtt"] (exec form)`, entrypoint)
		}
	})

	t.Run("keys, state and history stay out of the build context", func(t *testing.T) {
		data, err := os.ReadFile("Dockerfile.dockerignore")
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, l := range strings.Split(string(data), "\n") {
			if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
				lines = append(lines, l)
			}
		}
		for _, want := range []string{".git", "keys", "data"} {
			if !slices.Contains(lines, want) {
				t.Errorf("Dockerfile.dockerignore does not exclude %s", want)
			}
		}
	})
}
