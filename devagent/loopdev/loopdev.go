//go:build linux

// Package loopdev creates and removes Linux loop devices through
// /dev/loop-control, for tests and the CloudStack simulator. Every device is
// made with a fresh index (LOOP_CTL_ADD), so the kernel sends a real `add`
// uevent, and only a device still bound to the backing file it was given is
// ever removed.
package loopdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Control is the loop control device.
const Control = "/dev/loop-control"

// maxTries bounds the search for an unused loop index.
const maxTries = 64

// ErrNotOurs reports a loop device bound to another backing file than the
// one this Device was given; it is left alone.
var ErrNotOurs = errors.New("loop device bound to another backing file")

// Device is a loop device this process created.
type Device struct {
	// Index is N in /dev/loopN.
	Index int
	// Path is /dev/loopN.
	Path string
	// Backing is the backing file given to Bind or Create; empty while unbound.
	Backing string
	// seq is the kernel's diskseq of the device as this process last set it
	// up; it changes whenever the device is bound or unbound.
	seq string
}

// Name is the kernel name, loopN.
func (d *Device) Name() string { return "loop" + strconv.Itoa(d.Index) }

// Available reports why loop devices cannot be made here (not root, no
// /dev/loop-control), or nil.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("loopdev: not root")
	}
	f, err := os.OpenFile(Control, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: %w", err)
	}
	return f.Close()
}

// Add creates a new, unbound loop device with an unused index. The kernel
// sends `add` with size 0.
func Add(ctx context.Context) (*Device, error) {
	idx := nextIndex()
	for range maxTries {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		_, err := control(unix.LOOP_CTL_ADD, idx)
		if errors.Is(err, unix.EEXIST) {
			idx++
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("loopdev: LOOP_CTL_ADD %d: %w", idx, err)
		}
		d := &Device{Index: idx, Path: "/dev/loop" + strconv.Itoa(idx)}
		d.seq, _ = d.attr("diskseq")
		return d, nil
	}
	return nil, fmt.Errorf("loopdev: no unused loop index after %d tries", maxTries)
}

// Create makes a new loop device bound to backing: Add then Bind, moving on
// to another index when another process bound the fresh device first.
func Create(ctx context.Context, backing string) (*Device, error) {
	for range maxTries {
		d, err := Add(ctx)
		if err != nil {
			return nil, err
		}
		err = d.Bind(ctx, backing)
		if err == nil {
			return d, nil
		}
		if errors.Is(err, unix.EBUSY) {
			continue // another process took the fresh device: it is theirs
		}
		if _, rerr := control(unix.LOOP_CTL_REMOVE, d.Index); rerr != nil {
			err = errors.Join(err, fmt.Errorf("loopdev: LOOP_CTL_REMOVE %d: %w", d.Index, rerr))
		}
		return nil, err
	}
	return nil, fmt.Errorf("loopdev: every fresh loop device was taken after %d tries", maxTries)
}

// Lookup describes the loop device name (e.g. "loop3") as it is bound now,
// for a process that finds a device rather than creating it: Remove of the
// result leaves the device alone once it is re-bound or re-created. False
// when name is not a loop device, is unbound, or changed while being read.
func Lookup(name string) (*Device, bool) {
	s, ok := strings.CutPrefix(name, "loop")
	idx, err := strconv.Atoi(s)
	if !ok || err != nil {
		return nil, false
	}
	d := &Device{Index: idx, Path: "/dev/" + name}
	seq, _ := d.attr("diskseq")
	backing, bound := BackingFile(name)
	if again, _ := d.attr("diskseq"); !bound || again != seq {
		return nil, false
	}
	d.Backing, d.seq = backing, seq
	return d, true
}

// Bind attaches backing (opened read-write) to the device with
// LOOP_CONFIGURE, or LOOP_SET_FD + LOOP_SET_STATUS64 on kernels before 5.8.
// The kernel sends `change` with the new size.
func (d *Device) Bind(ctx context.Context, backing string) error {
	bf, err := os.OpenFile(backing, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: %w", err)
	}
	defer bf.Close()
	df, err := openNode(ctx, d.Path)
	if err != nil {
		return err
	}
	defer df.Close()
	var info unix.LoopInfo64
	copy(info.File_name[:len(info.File_name)-1], backing)
	cfg := unix.LoopConfig{Fd: uint32(bf.Fd()), Info: info}
	err = unix.IoctlLoopConfigure(int(df.Fd()), &cfg)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
		if err = unix.IoctlSetInt(int(df.Fd()), unix.LOOP_SET_FD, int(bf.Fd())); err == nil {
			err = unix.IoctlLoopSetStatus64(int(df.Fd()), &info)
		}
	}
	if err != nil {
		return fmt.Errorf("loopdev: configure %s: %w", d.Path, err)
	}
	d.Backing = backing
	d.seq, _ = d.attr("diskseq")
	return nil
}

// Unbind detaches the backing file (LOOP_CLR_FD) and keeps the device, so
// that a later Bind reuses its name with a new diskseq. The kernel sends
// `change` with size 0. A device no longer the one this Device set up is
// left alone with ErrNotOurs.
func (d *Device) Unbind() error {
	if err := d.ours(); err != nil {
		return err
	}
	if err := d.clearFD(); err != nil {
		return err
	}
	d.Backing = ""
	return nil
}

// clearFD detaches the backing file (LOOP_CLR_FD); a device already
// unbound (ENXIO) is not an error, an absent one wraps os.ErrNotExist.
func (d *Device) clearFD() error {
	if err := d.ioctl("LOOP_CLR_FD", unix.LOOP_CLR_FD); !errors.Is(err, unix.ENXIO) {
		return err
	}
	return nil
}

// Resize makes the device take the current size of its backing file
// (LOOP_SET_CAPACITY). The kernel sends `change` when the size changed.
func (d *Device) Resize() error {
	return d.ioctl("LOOP_SET_CAPACITY", unix.LOOP_SET_CAPACITY)
}

// ioctl opens the device and runs the argument-less loop ioctl req (named
// name in the error) on it; an absent device wraps os.ErrNotExist.
func (d *Device) ioctl(name string, req uint) error {
	f, err := os.OpenFile(d.Path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: %w", err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), req, 0); err != nil {
		return fmt.Errorf("loopdev: %s %s: %w", name, d.Path, err)
	}
	return nil
}

// Remove unbinds the device (LOOP_CLR_FD) and deletes it (LOOP_CTL_REMOVE;
// the kernel sends `remove`), retrying while it is busy until ctx ends. A
// device already gone is not an error. A device that is no longer the one
// this Device set up (its diskseq changed, or, on kernels without diskseq,
// it is bound to another file) is left alone with ErrNotOurs.
func (d *Device) Remove(ctx context.Context) error {
	if err := d.ours(); err != nil {
		return err
	}
	switch err := d.clearFD(); {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	}
	for {
		_, err := control(unix.LOOP_CTL_REMOVE, d.Index)
		if err == nil || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("loopdev: LOOP_CTL_REMOVE %d: %w", d.Index, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("loopdev: LOOP_CTL_REMOVE %d still busy: %w", d.Index, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ours checks that the device is still the one this Device set up.
func (d *Device) ours() error {
	if seq, ok := d.attr("diskseq"); ok && d.seq != "" {
		if seq != d.seq {
			return fmt.Errorf("loopdev: %s diskseq is %s, not %s: %w", d.Path, seq, d.seq, ErrNotOurs)
		}
		return nil
	}
	if b, ok := BackingFile(d.Name()); ok && b != d.Backing {
		return fmt.Errorf("loopdev: %s is bound to %q: %w", d.Path, b, ErrNotOurs)
	}
	return nil
}

// attr reads /sys/block/loopN/<name>.
func (d *Device) attr(name string) (string, bool) {
	b, err := os.ReadFile(filepath.Join("/sys/block", d.Name(), name))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

// BackingFile returns the backing file of loop device name (e.g. "loop3")
// from /sys/block, without the kernel's " (deleted)" suffix; false when the
// device is unbound or absent.
func BackingFile(name string) (string, bool) {
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)"), true
}

// control runs a /dev/loop-control ioctl with an index argument.
func control(req uint, idx int) (int, error) {
	f, err := os.OpenFile(Control, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(idx))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// nextIndex is one more than the highest loop index in /sys/block.
func nextIndex() int {
	next := 0
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		s, ok := strings.CutPrefix(e.Name(), "loop")
		if n, err := strconv.Atoi(s); ok && err == nil && n >= next {
			next = n + 1
		}
	}
	return next
}

// openNode opens the device node, waiting briefly for devtmpfs to create it.
func openNode(ctx context.Context, path string) (*os.File, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for {
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("loopdev: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("loopdev: %s did not appear: %w", path, errors.Join(err, ctx.Err()))
		case <-time.After(5 * time.Millisecond):
		}
	}
}
