// Package mosquitto runs a real Mosquitto broker on a loopback port as the
// untrusted upstream of tests and benchmarks, when the mosquitto binary is
// installed.
package mosquitto

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// Broker is a running Mosquitto process.
type Broker struct {
	bin  string
	dir  string
	port int
	cmd  *exec.Cmd
	done chan struct{}
}

// Available reports whether mosquitto is on PATH (or in /usr/sbin).
func Available() (string, bool) {
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, true
	}
	if _, err := os.Stat("/usr/sbin/mosquitto"); err == nil {
		return "/usr/sbin/mosquitto", true
	}
	return "", false
}

// Start starts mosquitto with persistence in dir, on a free loopback port.
func Start(dir string) (*Broker, error) { return StartWith(dir) }

// StartWith is Start with extra configuration lines (e.g.
// "max_packet_size 1024").
func StartWith(dir string, extra ...string) (*Broker, error) {
	bin, ok := Available()
	if !ok {
		return nil, errors.New("mosquitto not installed")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	b := &Broker{bin: bin, dir: dir, port: port}
	conf := fmt.Sprintf(`listener %d 127.0.0.1
allow_anonymous true
persistence true
persistence_location %s/
autosave_interval 1
max_inflight_messages 0
max_queued_messages 0
max_queued_bytes 0
message_size_limit 0
log_dest stderr
log_type error
log_type warning
`, port, dir)
	for _, l := range extra {
		conf += l + "\n"
	}
	if os.Geteuid() == 0 {
		// As root, mosquitto switches to the "mosquitto" user, which cannot
		// write the persistence file into our directory: stay root.
		conf += "user root\n"
	}
	if err := os.WriteFile(filepath.Join(dir, "mosquitto.conf"), []byte(conf), 0o600); err != nil {
		return nil, err
	}
	if err := b.start(); err != nil {
		return nil, err
	}
	return b, nil
}

func (b *Broker) start() error {
	cmd := exec.Command(b.bin, "-c", filepath.Join(b.dir, "mosquitto.conf"))
	logf, err := os.OpenFile(filepath.Join(b.dir, "mosquitto.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start mosquitto: %w", err)
	}
	b.cmd, b.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(b.done) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", b.Addr(), 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-b.done:
			log, _ := os.ReadFile(filepath.Join(b.dir, "mosquitto.log"))
			return fmt.Errorf("mosquitto exited at start: %s", log)
		case <-time.After(20 * time.Millisecond):
		}
	}
	b.Close()
	return errors.New("mosquitto did not start listening within 10s")
}

// Addr is 127.0.0.1:port; URL is tcp://127.0.0.1:port.
func (b *Broker) Addr() string { return fmt.Sprintf("127.0.0.1:%d", b.port) }
func (b *Broker) URL() string  { return "tcp://" + b.Addr() }

// Close stops mosquitto with SIGTERM (it saves its persistence file).
func (b *Broker) Close() error {
	if b.cmd == nil {
		return nil
	}
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.done
	}
	b.cmd = nil
	return nil
}

// Kill stops mosquitto with SIGKILL: no clean shutdown.
func (b *Broker) Kill() error {
	if b.cmd == nil {
		return nil
	}
	_ = b.cmd.Process.Kill()
	<-b.done
	b.cmd = nil
	return nil
}

// Pause freezes mosquitto with SIGSTOP (a partition: connections stay open,
// nothing moves); Resume continues it with SIGCONT.
func (b *Broker) Pause() error  { return b.cmd.Process.Signal(syscall.SIGSTOP) }
func (b *Broker) Resume() error { return b.cmd.Process.Signal(syscall.SIGCONT) }

// Restart stops mosquitto cleanly and starts it again on the same port.
func (b *Broker) Restart() error {
	b.Close()
	return b.start()
}
