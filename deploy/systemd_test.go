package deploy

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// unit is a parsed systemd unit file: section -> key -> values in order (a
// key may repeat).
type unit map[string]map[string][]string

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	var cont string
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if cont != "" {
			line, cont = cont+" "+line, ""
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cont = strings.TrimSuffix(line, `\`)
			continue
		}
		if line[0] == '[' {
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Fatalf("%s:%d: not a key=value line in a section: %q", path, n, line)
		}
		u[section][strings.TrimSpace(key)] = append(u[section][strings.TrimSpace(key)], strings.TrimSpace(value))
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// hardening is what every smqtt unit must say in [Service], value for
// value (the hardening, and how the service restarts and reloads).
var hardening = map[string]string{
	"DynamicUser":             "yes",
	"ConfigurationDirectory":  "smqtt",
	"ProtectSystem":           "strict",
	"ProtectHome":             "yes",
	"PrivateTmp":              "yes",
	"PrivateDevices":          "yes",
	"NoNewPrivileges":         "yes",
	"CapabilityBoundingSet":   "",
	"AmbientCapabilities":     "",
	"RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
	"MemoryDenyWriteExecute":  "yes",
	"LockPersonality":         "yes",
	"RestrictNamespaces":      "yes",
	"RestrictSUIDSGID":        "yes",
	"ProtectKernelTunables":   "yes",
	"ProtectKernelModules":    "yes",
	"ProtectControlGroups":    "yes",
	"SystemCallArchitectures": "native",
	"UMask":                   "0077",
	"Restart":                 "on-failure",
	"ExecReload":              "/bin/kill -HUP $MAINPID", // both reload on SIGHUP
	"LimitNOFILE":             "65536",
}

var units = []struct {
	file, exec, stateDir string
}{
	{
		file:     "smqtt-sidecar.service",
		exec:     "/usr/local/bin/smqtt sidecar -c /etc/smqtt/sidecar.yaml --log-format json",
		stateDir: "smqtt-sidecar",
	},
	{
		file:     "smqtt-keyserver.service",
		exec:     "/usr/local/bin/smqtt keyserver -c /etc/smqtt/keyserver.yaml --log-format json",
		stateDir: "smqtt-keyserver",
	},
}

func TestSystemdUnitsAreHardened(t *testing.T) {
	for _, c := range units {
		t.Run(c.file, func(t *testing.T) {
			u := parseUnit(t, filepath.Join("systemd", c.file))
			svc := u["Service"]
			if svc == nil {
				t.Fatal("no [Service] section")
			}
			one := func(key string) (string, bool) {
				v, ok := svc[key]
				if !ok {
					return "", false
				}
				if len(v) != 1 {
					t.Errorf("%s= is set %d times, want once", key, len(v))
				}
				return v[len(v)-1], true
			}
			for key, want := range hardening {
				if got, ok := one(key); !ok {
					t.Errorf("%s= missing (want %q)", key, want)
				} else if got != want {
					t.Errorf("%s=%s, want %q", key, got, want)
				}
			}
			if got, _ := one("ExecStart"); got != c.exec {
				t.Errorf("ExecStart=%s, want %q", got, c.exec)
			}
			if got, _ := one("StateDirectory"); got != c.stateDir {
				t.Errorf("StateDirectory=%s, want %q", got, c.stateDir)
			}
			filters := strings.Join(svc["SystemCallFilter"], " ")
			if !strings.HasPrefix(svc["SystemCallFilter"][0], "@system-service") {
				t.Errorf("SystemCallFilter= must start from the @system-service allow list, have %q", filters)
			}
			if !strings.Contains(filters, "~@privileged") {
				t.Errorf("SystemCallFilter= does not deny @privileged: %q", filters)
			}
			// The identity reaches the transient user as a credential from the
			// configuration directory.
			creds := svc["LoadCredential"]
			if len(creds) == 0 || !strings.HasPrefix(creds[0], "identity:/etc/smqtt/") {
				t.Errorf("LoadCredential=%q, want identity:/etc/smqtt/...", creds)
			}
			if got := u["Install"]["WantedBy"]; len(got) != 1 || got[0] != "multi-user.target" {
				t.Errorf("[Install] WantedBy=%q, want multi-user.target", got)
			}
		})
	}
}

// TestSystemdAcceptsTheUnits has systemd check each unit (with ExecStart
// pointed at an executable that exists here) and rate its exposure offline:
// no warnings, and an exposure level of at most 2.0 of 10.
func TestSystemdAcceptsTheUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range units {
		t.Run(c.file, func(t *testing.T) {
			text, err := os.ReadFile(filepath.Join("systemd", c.file))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(text), "/usr/local/bin/smqtt ") {
				t.Fatal("ExecStart does not run /usr/local/bin/smqtt")
			}
			path := filepath.Join(t.TempDir(), c.file)
			text = []byte(strings.ReplaceAll(string(text), "/usr/local/bin/smqtt ", self+" "))
			if err := os.WriteFile(path, text, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
			if err != nil || len(out) > 0 {
				t.Errorf("systemd-analyze verify: %v\n%s", err, out)
			}
			out, err = exec.Command(analyze, "security", "--offline=true", "--threshold=20", "--no-pager", path).CombinedOutput()
			if strings.Contains(string(out), "unrecognized option") {
				t.Skipf("systemd-analyze security cannot rate a unit file offline (systemd < 250): %s", firstLine(out))
			}
			if err != nil {
				t.Errorf("systemd-analyze security: exposure above 2.0 or error: %v\n%s", err, out)
			}
			t.Log(lastLine(out))
		})
	}
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	return s[strings.LastIndex(s, "\n")+1:]
}
