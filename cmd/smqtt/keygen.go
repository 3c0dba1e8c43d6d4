package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/smqtt/smqtt/gkd"
)

func runKeygen(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keygen", "keygen [--group] [--kem hybrid|x25519] [--force] -o FILE", stderr)
	out := fs.String("o", "", "file to write (required); an identity's public key goes to FILE.pub")
	group := fs.Bool("group", false, "write a random 256-bit group key for sidecar.static_keys instead of an identity")
	kem := fs.String("kem", string(gkd.DefaultSuite), "key agreement of the identity: hybrid (ML-KEM-768 + X25519) or x25519")
	force := fs.Bool("force", false, "overwrite existing files")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *out == "" {
		return fmt.Errorf("-o: missing: name the file to write")
	}
	if *group {
		key, err := gkd.GenerateGroupKey()
		if err != nil {
			return err
		}
		if err := gkd.WriteGroupKey(*out, key, *force); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "wrote group key %s (mode 0600); give the same file to every sidecar of the group\n", *out)
		return nil
	}
	suite, err := gkd.ParseSuite(*kem)
	if err != nil {
		return fmt.Errorf("--kem: %w", err)
	}
	id, err := gkd.GenerateIdentity(suite)
	if err != nil {
		return err
	}
	if err := gkd.WriteIdentity(*out, id, *force); err != nil {
		return err
	}
	fmt.Fprintf(stderr, "wrote identity %s (mode 0600) and its public key %s.pub\n", *out, *out)
	fmt.Fprintln(stdout, id.Public().String())
	return nil
}

func runPubkey(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("pubkey", "pubkey FILE", stderr)
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		fs.Usage()
		return flag.ErrHelp
	}
	if len(args) != 1 {
		fmt.Fprintln(stderr, "smqtt pubkey: name one identity file (smqtt pubkey FILE)")
		return errUsage
	}
	id, err := gkd.LoadIdentity(args[0])
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, id.Public().String())
	return nil
}
