package testenv

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago,
// below the kernel's ephemeral range: a port of that range can be taken
// meanwhile as the local port of any outgoing connection (a restarted
// cluster member then could not listen on its own route port). No port is
// returned twice, in a process or to two test processes alive at once
// (go test runs packages in parallel): each port given is claimed with a
// lock on a file, held until the process ends, so that a port between
// its probe and its server's listen, or of a member stopped for a while,
// is not given to another package's server.
func FreePort(t testing.TB) int {
	t.Helper()
	ports.mu.Lock()
	defer ports.mu.Unlock()
	if ports.given == nil {
		ports.given = map[int]bool{}
	}
	lo := ephemeralLow()
	for range 200 {
		p := 10000 + rand.IntN(max(lo-10000, 1))
		if ports.given[p] || !claimPort(p) {
			continue
		}
		ports.given[p] = true // claimed: not tried again
		if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			_ = l.Close()
			return p
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ports are the ports FreePort gave or claimed, and the files holding
// the claims.
var ports struct {
	mu     sync.Mutex
	given  map[int]bool
	claims []*os.File
}

// claimPort takes port p for this process among the test processes of
// the machine: an exclusive lock on a file named after it, which the
// kernel drops when the process ends, however it ends. It reports false
// when another process holds it. ports.mu is held.
func claimPort(p int) bool {
	dir := filepath.Join(os.TempDir(), "volumed-test-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return true // no claims possible: the probe alone decides
	}
	f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(p)), os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		return true
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return !errors.Is(err, unix.EWOULDBLOCK)
	}
	ports.claims = append(ports.claims, f)
	return true
}

// ephemeralLow is the first port of the kernel's ephemeral range
// (32768 when it cannot tell).
func ephemeralLow() int {
	raw, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	var lo, hi int
	if n, _ := fmt.Sscan(string(raw), &lo, &hi); n != 2 || lo <= 10000 {
		return 32768
	}
	return lo
}

// Redis is a real redis-server process started for one test.
type Redis struct {
	// Addr is the server's host:port on 127.0.0.1.
	Addr string
	cmd  *exec.Cmd
}

// URL is the redis:// URL of the server.
func (r *Redis) URL() string { return "redis://" + r.Addr + "/0" }

// Stop kills the server (as a crash would); the test's cleanup also stops it.
func (r *Redis) Stop() {
	if r.cmd.Process != nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
}

// StartRedis starts redis-server on a free loopback port with no
// persistence and the extra arguments, and stops it when the test ends.
// A server that exits before it is ready (its port taken meanwhile by a
// process that did not claim it) is started again on another port, twice
// at most. It skips (fails under CI=true) when redis-server is not
// installed.
func StartRedis(t testing.TB, extra ...string) *Redis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	Require(t, err == nil, "needs redis-server on PATH (apt-get install redis-server)")
	for try := 1; ; try++ {
		r, out, ok := startRedis(t, bin, extra)
		switch {
		case ok:
			return r
		case try == 3:
			t.Fatalf("redis-server on %s exited before it was ready, three times; its output:\n%s", r.Addr, out)
		}
		t.Logf("redis-server on %s exited before it was ready; again on another port. Its output:\n%s", r.Addr, out)
	}
}

// startRedis is one attempt of StartRedis: ok when the server is ready,
// else its output (it exited).
func startRedis(t testing.TB, bin string, extra []string) (r *Redis, out string, ok bool) {
	t.Helper()
	port := FreePort(t)
	cmd := exec.Command(bin, append([]string{"--port", fmt.Sprint(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", t.TempDir()}, extra...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	r = &Redis{Addr: fmt.Sprintf("127.0.0.1:%d", port), cmd: cmd}
	t.Cleanup(r.Stop)
	ready, exited := make(chan struct{}), make(chan string, 1)
	go func() {
		var lines strings.Builder
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "Ready to accept connections") {
				close(ready)
				for sc.Scan() {
				}
				return
			}
		}
		exited <- lines.String() // stdout closed: the server exited
	}()
	select {
	case <-ready:
		return r, "", true
	case out := <-exited:
		r.Stop() // waits for the process, and so for stderr
		return r, out + stderr.String(), false
	case <-time.After(30 * time.Second):
		t.Fatalf("redis-server on %s did not become ready", r.Addr)
		return nil, "", false
	}
}
