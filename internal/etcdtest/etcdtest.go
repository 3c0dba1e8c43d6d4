// Package etcdtest starts real etcd servers (the etcd binary, Debian's
// etcd-server package) for tests: one node or a cluster of three.
package etcdtest

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Node is one etcd process of a Cluster.
type Node struct {
	Name      string
	ClientURL string
	cmd       *exec.Cmd
	args      []string
	dir       string
}

// Cluster is a running etcd cluster.
type Cluster struct {
	Nodes []*Node
	t     testing.TB
}

// Endpoints returns the client URLs of every node.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, n.ClientURL)
	}
	return out
}

// Binary returns the etcd binary's path, or skips the test when there is
// none (apt-get install -y etcd-server).
func Binary(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("etcd not installed (apt-get install -y etcd-server)")
	}
	return p
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Start starts an etcd cluster of n nodes and waits until it serves.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	Binary(t)
	c := &Cluster{t: t}
	var peers []string
	peerURLs := make([]string, n)
	for i := range n {
		name := fmt.Sprintf("e%d", i)
		peerURLs[i] = fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
		peers = append(peers, name+"="+peerURLs[i])
		c.Nodes = append(c.Nodes, &Node{Name: name, ClientURL: fmt.Sprintf("http://127.0.0.1:%d", freePort(t))})
	}
	base := t.TempDir()
	for i, nd := range c.Nodes {
		nd.dir = filepath.Join(base, nd.Name)
		nd.args = []string{
			"--name", nd.Name, "--data-dir", nd.dir,
			"--listen-client-urls", nd.ClientURL, "--advertise-client-urls", nd.ClientURL,
			"--listen-peer-urls", peerURLs[i], "--initial-advertise-peer-urls", peerURLs[i],
			"--initial-cluster", strings.Join(peers, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", filepath.Base(base),
			"--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
			"--logger", "zap", "--log-outputs", filepath.Join(base, nd.Name+".log"),
		}
		c.start(nd)
	}
	t.Cleanup(c.Stop)
	c.WaitReady(30 * time.Second)
	return c
}

func (c *Cluster) start(nd *Node) {
	nd.cmd = exec.Command(Binary(c.t), nd.args...)
	nd.cmd.Env = append(os.Environ(), "ETCD_UNSUPPORTED_ARCH=")
	if err := nd.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
}

// WaitReady waits until every running node answers /health.
func (c *Cluster) WaitReady(d time.Duration) {
	deadline := time.Now().Add(d)
	for _, nd := range c.Nodes {
		if nd.cmd == nil {
			continue
		}
		for {
			if healthy(nd.ClientURL) {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("etcd %s not ready after %v", nd.Name, d)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func healthy(url string) bool {
	cl := http.Client{Timeout: time.Second}
	resp, err := cl.Get(url + "/health")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode == 200 && strings.Contains(string(b), `"true"`)
}

// Kill SIGKILLs a node.
func (c *Cluster) Kill(nd *Node) {
	if nd.cmd != nil {
		nd.cmd.Process.Signal(syscall.SIGKILL)
		nd.cmd.Wait()
		nd.cmd = nil
	}
}

// Restart starts a killed node again on its data.
func (c *Cluster) Restart(nd *Node) {
	for i, a := range nd.args {
		if a == "--initial-cluster-state" {
			nd.args[i+1] = "existing"
		}
	}
	c.start(nd)
}

// Stop kills every node.
func (c *Cluster) Stop() {
	for _, nd := range c.Nodes {
		c.Kill(nd)
	}
}
