// Package soak holds the bounded soak run (not in the default test run):
//
//	go test -tags soak -run Soak -timeout 30m -v ./internal/soak            # 10 minutes
//	SMQTT_SOAK=2m go test -tags soak -run Soak -timeout 10m -v ./internal/soak
//
// A key server and two sidecars (update scheme) run on a Mosquitto upstream
// under a steady protected QoS 1 stream, with a member joining and leaving
// every 20 s (two rekeys) and Mosquitto restarted every 60 s. At the end
// every message must have arrived once and in order, and goroutines and
// heap must not have grown.
package soak
