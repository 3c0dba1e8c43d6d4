// Package config reads the YAML file that configures both smqtt roles: the
// sidecar (section "sidecar:") and the key server (section "keyserver:").
// config.example.yaml at the repository root lists and explains every key.
//
// One file may hold both sections; a process reads the section of its role:
//
//	f, err := config.Load("smqtt.yaml")     // syntax, unknown keys, types, defaults
//	if err != nil { ... }
//	sc, err := f.SidecarConfig()            // full validation of the sidecar section
//	if err != nil { ... }
//	for _, w := range sc.Warnings() { slog.Warn(w) }
//
// Loading is strict. Unknown keys are errors (a misspelt key must not silently
// fall back to a default), and so is a value of the wrong type. Keys that are
// absent, or present with an empty (null) value, take their documented
// defaults; a value given explicitly, even zero, is kept and validated, so
// "skew_slots: 0" means zero and "keepalive: 0s" is refused rather than
// replaced.
//
// Relative file paths in the configuration (identities, public key files,
// static group keys, TLS files, data directories, the key server's store, and
// the defaults "data/sidecar" and "data/keyserver.db") are resolved against
// the directory of the configuration file: Load passes that directory to
// Parse. Parse with an empty baseDir leaves them relative to the process's
// working directory.
//
// Every error is one line that starts with "config: ", names the key path in
// the file (for example "sidecar.protect[1].group") and says what is wrong; it
// is an *Error, and errors.Is(err, ErrInvalid) holds for all of them except
// a failure to read the file itself.
//
// The package also holds the MQTT topic-filter rules the rest of smqtt shares:
// ValidFilter, ValidTopic and MatchFilter.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// ErrInvalid is wrapped by every error that reports a problem with the
// content of a configuration.
var ErrInvalid = errors.New("invalid configuration")

// An Error is one problem with a configuration, found at one key.
type Error struct {
	Path string // key path, such as "sidecar.protect[1].group"; empty for the whole document
	Line int    // line in the YAML source, or 0 if unknown (a default, or no source)
	Err  error  // what is wrong
}

// Error returns the problem on one line:
// "config: sidecar.upstream.url: unsupported scheme "htp" (…) (line 7)".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("config: ")
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Err.Error())
	if e.Line > 0 {
		fmt.Fprintf(&b, " (line %d)", e.Line)
	}
	return oneLine(b.String())
}

// Unwrap makes errors.Is match both ErrInvalid and the underlying cause (for
// instance fs.ErrNotExist for a missing key file).
func (e *Error) Unwrap() []error { return []error{ErrInvalid, e.Err} }

func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n") {
		return s
	}
	return strings.Join(strings.Fields(strings.NewReplacer("\r", " ", "\n", " ").Replace(s)), " ")
}

// File is a parsed configuration file. A section that the file leaves out is
// nil.
type File struct {
	Sidecar   *Sidecar   `yaml:"sidecar"`
	Keyserver *Keyserver `yaml:"keyserver"`

	lines map[string]int // key path -> line of the key, for error messages
}

// Load reads the configuration file at path, parses it and fills in defaults.
// Relative paths inside it are resolved against the file's directory. Load
// does not validate a role: call SidecarConfig or KeyserverConfig.
func Load(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(data, filepath.Dir(path))
}

// Parse parses a configuration and fills in defaults. Relative file paths in
// it are resolved against baseDir, which should be the directory of the
// configuration file (Load does this); an empty baseDir leaves them relative.
// Parse rejects YAML syntax errors, unknown keys and values of the wrong type;
// it does not validate a role: call SidecarConfig or KeyserverConfig.
func Parse(data []byte, baseDir string) (*File, error) {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if err == io.EOF {
			return &File{lines: map[string]int{}}, nil // empty document: no sections
		}
		return nil, yamlError(err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		if err != nil {
			return nil, yamlError(err)
		}
		return nil, &Error{Line: extra.Line, Err: errors.New("more than one YAML document; want exactly one")}
	}

	idx, err := indexDocument(&doc)
	if err != nil {
		return nil, err
	}

	f := &File{lines: idx.lines()}
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	if err := strict.Decode(f); err != nil {
		var te *yaml.TypeError
		if errors.As(err, &te) && len(te.Errors) > 0 {
			return nil, idx.typeError(te.Errors[0])
		}
		return nil, yamlError(err)
	}

	if f.Sidecar != nil {
		f.Sidecar.setDefaults(idx.isSet)
		f.Sidecar.resolvePaths(baseDir)
	}
	if f.Keyserver != nil {
		f.Keyserver.setDefaults(idx.isSet)
		f.Keyserver.resolvePaths(baseDir)
	}
	return f, nil
}

// SidecarConfig validates the sidecar section and returns it. It is an error
// if the file has no sidecar section.
func (f *File) SidecarConfig() (*Sidecar, error) {
	if f.Sidecar == nil {
		return nil, &Error{Path: "sidecar", Err: errors.New("section missing")}
	}
	v := &validator{lines: f.lines}
	f.Sidecar.validate(v)
	if v.err != nil {
		return nil, v.err
	}
	return f.Sidecar, nil
}

// KeyserverConfig validates the keyserver section and returns it. It is an
// error if the file has no keyserver section.
func (f *File) KeyserverConfig() (*Keyserver, error) {
	if f.Keyserver == nil {
		return nil, &Error{Path: "keyserver", Err: errors.New("section missing")}
	}
	v := &validator{lines: f.lines}
	f.Keyserver.validate(v)
	if v.err != nil {
		return nil, v.err
	}
	return f.Keyserver, nil
}

// validator keeps the first problem found; validation code reports problems
// in file order, so the operator sees the first one in the file.
type validator struct {
	lines map[string]int
	err   error
}

func (v *validator) errorf(path, format string, args ...any) {
	v.wrap(path, fmt.Errorf(format, args...))
}

func (v *validator) wrap(path string, err error) {
	if v.err == nil && err != nil {
		v.err = &Error{Path: path, Line: v.lines[path], Err: err}
	}
}

// resolve makes a relative path relative to baseDir. Empty paths stay empty.
func resolve(baseDir, path string) string {
	if path == "" || baseDir == "" || filepath.IsAbs(path) {
		return path
	}
	return filepath.Join(baseDir, path)
}

// checkFile reports a problem if path does not name a readable regular file.
func checkFile(v *validator, key, path string) {
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		v.wrap(key, err)
	case fi.IsDir():
		v.errorf(key, "%s is a directory, want a file", path)
	}
}

// checkAddress checks a host:port listening address.
func checkAddress(v *validator, key, addr string) {
	if err := validHostPort(addr); err != nil {
		v.errorf(key, "%w", err)
	}
}

// checkPositive checks a duration that must be greater than zero.
func checkPositive(v *validator, key string, d time.Duration) {
	if d <= 0 {
		v.errorf(key, "must be positive, got %v", d)
	}
}
