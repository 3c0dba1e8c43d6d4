// Command smqtt is the one binary of smqtt: end-to-end encryption for MQTT
// through a broker you do not trust.
//
//	smqtt sidecar -c FILE      run a sidecar (local broker + encrypting bridge)
//	smqtt keyserver -c FILE    run the key server
//	smqtt keygen -o FILE       make an identity (or --group: a static group key)
//	smqtt pubkey FILE          print an identity's public key
//	smqtt demo                 run everything in one process and check it
//	smqtt bench ...            measure throughput and latency
//	smqtt version              print the version
//
// Logs go to stderr (--log-format text|json, --log-level debug|info|warn|error).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"sidecar", "run a sidecar from a config file (-c FILE)", runSidecar},
		{"keyserver", "run the key server from a config file (-c FILE)", runKeyserver},
		{"keygen", "write a new identity (-o FILE) or, with --group, a static group key", runKeygen},
		{"pubkey", "print the public key of an identity file", runPubkey},
		{"demo", "run broker, sidecars and apps in one process and check no plaintext leaks", runDemo},
		{"bench", "measure throughput and latency (smqtt bench -h)", runBench},
		{"version", "print the version", runVersion},
	}
}

// errUsage marks errors already explained by a usage message.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(args[1:], stdout, stderr)
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, errUsage):
				return 2
			default:
				fmt.Fprintf(stderr, "smqtt %s: %s\n", c.name, oneLine(err))
				return 1
			}
		}
	}
	fmt.Fprintf(stderr, "smqtt: unknown command %q (run smqtt -h)\n", args[0])
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "smqtt: end-to-end encryption for MQTT through an untrusted broker")
	fmt.Fprintln(w, "\nUsage: smqtt <command> [flags]   (smqtt <command> -h for its flags)")
	fmt.Fprintln(w, "\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
}

// oneLine keeps an error to a single line.
func oneLine(err error) string {
	return strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
}

// newFlags makes a flag set whose errors and help go to stderr.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("smqtt "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: smqtt %s\n\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses and turns flag errors into errUsage (the flag package
// has printed them already).
func parseFlags(fs *flag.FlagSet, args []string) error {
	// A bad flag is one line naming it; -h prints the whole usage.
	out, usage := fs.Output(), fs.Usage
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	fs.SetOutput(out)
	fs.Usage = usage
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.Usage()
			return err
		}
		fmt.Fprintf(out, "%s: %v (see %s -h)\n", fs.Name(), err, fs.Name())
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return errUsage
	}
	return nil
}

// logFlags adds --log-format and --log-level and returns a constructor.
func logFlags(fs *flag.FlagSet, stderr io.Writer, defaultLevel string) func() (*slog.Logger, error) {
	format := fs.String("log-format", "text", "log format: text or json")
	level := fs.String("log-level", defaultLevel, "log level: debug, info, warn or error")
	return func() (*slog.Logger, error) {
		var lv slog.Level
		if err := lv.UnmarshalText([]byte(*level)); err != nil {
			return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", *level)
		}
		o := &slog.HandlerOptions{Level: lv}
		switch *format {
		case "text":
			return slog.New(slog.NewTextHandler(stderr, o)), nil
		case "json":
			return slog.New(slog.NewJSONHandler(stderr, o)), nil
		}
		return nil, fmt.Errorf("--log-format: %q is not text or json", *format)
	}
}

// roleArgs parses a role's flags (-c FILE, --log-format, --log-level) and
// returns the config path and the logger.
func roleArgs(role string, args []string, stderr io.Writer) (string, *slog.Logger, error) {
	fs := newFlags(role, role+" -c FILE [--log-format text|json] [--log-level LEVEL]", stderr)
	cfgPath := fs.String("c", "", "config file (required; the "+role+": section)")
	newLog := logFlags(fs, stderr, "info")
	if err := parseFlags(fs, args); err != nil {
		return "", nil, err
	}
	log, err := newLog()
	if err != nil {
		return "", nil, err
	}
	if *cfgPath == "" {
		return "", nil, errors.New("-c: missing: name the config file")
	}
	return *cfgPath, log, nil
}

func runVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("version", "version", stderr)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "smqtt", versionString())
	return nil
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if rev != "" {
			if len(rev) > 12 {
				rev = rev[:12]
			}
			if dirty {
				rev += "-dirty"
			}
			return "dev-" + rev
		}
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			return bi.Main.Version
		}
	}
	return "dev"
}
