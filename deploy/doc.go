// Package deploy holds what an operator installs next to the smqtt binary,
// and the tests that keep those files honest. It has no Go API.
//
//   - systemd/smqtt-sidecar.service, systemd/smqtt-keyserver.service:
//     hardened units (a transient user, a read-only system, no capabilities,
//     a system-call allow list); key files reach the service as systemd
//     credentials. Each file's header says how to install it.
//   - Dockerfile: a static binary on a distroless base, as a non-root user.
//   - mosquitto/acl: a Mosquitto ACL that confines each member to its own
//     key-distribution topics; mosquitto/README.md explains the usernames it
//     expects.
//
// The tests run the ACL in a real Mosquitto (when installed), check that
// the units keep their hardening and that systemd accepts them (when
// systemd-analyze is installed), and check the Dockerfile's build recipe.
package deploy
