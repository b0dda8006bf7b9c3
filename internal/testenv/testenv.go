// Package testenv is the shared test harness: polling for a condition,
// requirements that skip on a laptop but fail under CI=true, and real
// servers (redis-server, embedded NATS) started on free ports.
package testenv

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// InCI reports whether the tests run in CI (CI=true), where a missing
// requirement is a failure, not a skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Require skips the test when ok is false, or fails it under CI=true.
func Require(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("requirement missing under CI=true: %s", msg)
	}
	t.Skipf("skipping: %s", msg)
}

// RequireRoot requires root.
func RequireRoot(t testing.TB) {
	t.Helper()
	Require(t, os.Geteuid() == 0, "needs root")
}

// RequireLoopControl requires root and a usable /dev/loop-control.
func RequireLoopControl(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	f, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err == nil {
		f.Close()
	}
	Require(t, err == nil, "needs /dev/loop-control: %v", err)
}

// Eventually polls cond every 10 ms until it is true, failing the test
// with the message if it is still false after timeout.
func Eventually(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v: %s", timeout, fmt.Sprintf(format, args...))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Buffer collects output (a process's, a logger's) that a test reads
// while it is written.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Lines is everything written so far, a line each, without the last
// newline.
func (b *Buffer) Lines() []string {
	return strings.Split(strings.TrimSpace(b.String()), "\n")
}

// Mentioning returns the lines that contain s.
func Mentioning(lines []string, s string) []string {
	var out []string
	for _, l := range lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}
