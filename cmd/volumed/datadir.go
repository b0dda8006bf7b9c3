package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// lockFileName is the file of the data dir a running volumed holds an
// exclusive flock on; the kernel releases it when the process ends,
// however it ends.
const lockFileName = "volumed.lock"

// dirLock is the data dir's lock, held until Close.
type dirLock struct{ f *os.File }

// lockDataDir takes the lock of dir without waiting. A second volumed on
// the same data dir stops there (a configuration error), before its
// embedded server opens the JetStream files the first one is writing.
func lockDataDir(dir string) (*dirLock, error) {
	path := filepath.Join(dir, lockFileName)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data dir lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: --data-dir %s is in use by another volumed (it holds %s)", errUsage, dir, path)
		}
		return nil, fmt.Errorf("data dir lock %s: %w", path, err)
	}
	return &dirLock{f: f}, nil
}

// Close releases the lock; closing it again does nothing.
func (l *dirLock) Close(context.Context) error {
	if err := l.f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return err
	}
	return nil
}
