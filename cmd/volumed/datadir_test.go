package main

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestDataDirInUse: a volumed started on the data dir of one running
// stops at once with a configuration error (exit 2) naming the dir,
// before it starts anything (here the profiles' listener would fail
// first, with exit 1, on an address the test holds).
func TestDataDirInUse(t *testing.T) {
	dir := t.TempDir()
	held, err := os.OpenFile(filepath.Join(dir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := syscall.Flock(int(held.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	var out bytes.Buffer
	code := run(cs("--data-dir", dir, "--listen", "127.0.0.1:0", "--pprof-listen", busy.Addr().String()), &out)
	if code != 2 || !strings.Contains(out.String(), "--data-dir "+dir+" is in use by another volumed") {
		t.Fatalf("exit %d, want 2 naming the data dir in use:\n%s", code, out.String())
	}
	// Once the other one is gone, the lock is free again.
	if err := held.Close(); err != nil {
		t.Fatal(err)
	}
	lock, err := lockDataDir(dir)
	if err != nil {
		t.Fatalf("lock after the holder ended: %v", err)
	}
	if err := lock.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := lock.Close(t.Context()); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
