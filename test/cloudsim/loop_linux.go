package cloudsim

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

const loopControl = "/dev/loop-control"

// loops creates and removes this simulator's loop devices: the ones whose
// backing file lies under dir. It never touches any other loop device.
type loops struct {
	dir string
}

// newLoops checks that loop devices can be made (root, /dev/loop-control).
func newLoops(dir string) (*loops, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("not root")
	}
	f, err := os.OpenFile(loopControl, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	f.Close()
	return &loops{dir: dir}, nil
}

// ctl runs a /dev/loop-control ioctl with an index argument.
func ctl(req uint, idx int) (int, error) {
	f, err := os.OpenFile(loopControl, os.O_RDWR|unix.O_CLOEXEC, 0)
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
		if n, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "loop")); err == nil && strings.HasPrefix(e.Name(), "loop") && n >= next {
			next = n + 1
		}
	}
	return next
}

// attach creates a NEW loop device (LOOP_CTL_ADD of an unused index, so
// the kernel sends `add`) and binds it to backing. It returns /dev/loopN.
func (l *loops) attach(ctx context.Context, backing string) (string, error) {
	idx := nextIndex()
	for tries := 0; tries < 64; tries++ {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		if _, err := ctl(unix.LOOP_CTL_ADD, idx); err != nil {
			if errors.Is(err, unix.EEXIST) {
				idx++
				continue
			}
			return "", fmt.Errorf("LOOP_CTL_ADD %d: %w", idx, err)
		}
		dev := "/dev/loop" + strconv.Itoa(idx)
		err := bind(ctx, dev, backing)
		if err == nil {
			return dev, nil
		}
		if errors.Is(err, unix.EBUSY) {
			// Another process bound our fresh device first: it is theirs now.
			idx++
			continue
		}
		if _, rerr := ctl(unix.LOOP_CTL_REMOVE, idx); rerr != nil {
			err = errors.Join(err, fmt.Errorf("LOOP_CTL_REMOVE %d: %w", idx, rerr))
		}
		return "", err
	}
	return "", errors.New("no free loop index after 64 tries")
}

// bind attaches backing to the loop device dev.
func bind(ctx context.Context, dev, backing string) error {
	bf, err := os.OpenFile(backing, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer bf.Close()
	var df *os.File
	// devtmpfs creates the node at once; allow a moment for slow hosts.
	deadline := time.Now().Add(2 * time.Second)
	for {
		df, err = os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", dev, err)
	}
	defer df.Close()
	var info unix.LoopInfo64
	copy(info.File_name[:len(info.File_name)-1], backing)
	cfg := unix.LoopConfig{Fd: uint32(bf.Fd()), Info: info}
	err = unix.IoctlLoopConfigure(int(df.Fd()), &cfg)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
		// Kernels before 5.8: LOOP_SET_FD + LOOP_SET_STATUS64.
		if err = unix.IoctlSetInt(int(df.Fd()), unix.LOOP_SET_FD, int(bf.Fd())); err == nil {
			err = unix.IoctlLoopSetStatus64(int(df.Fd()), &info)
		}
	}
	if err != nil {
		return fmt.Errorf("configure %s: %w", dev, err)
	}
	return nil
}

// backingOf returns the backing file of /dev/loopN, without " (deleted)".
func backingOf(dev string) (string, bool) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)"), true
}

// ours reports whether path lies under the simulator's directory.
func (l *loops) ours(path string) bool {
	return strings.HasPrefix(path, l.dir+string(filepath.Separator))
}

// owned lists this simulator's loop devices: device path → backing file.
func (l *loops) owned() map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "loop") {
			continue
		}
		dev := "/dev/" + e.Name()
		if b, ok := backingOf(dev); ok && l.ours(b) {
			out[dev] = b
		}
	}
	return out
}

// detach unbinds dev (LOOP_CLR_FD) and removes it (LOOP_CTL_REMOVE, the
// kernel sends `remove`), retrying while it is busy until ctx ends. It
// refuses a device whose backing file is not ours.
func (l *loops) detach(ctx context.Context, dev string) error {
	if b, ok := backingOf(dev); ok && !l.ours(b) {
		return fmt.Errorf("%s is bound to %s, not ours", dev, b)
	}
	idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(dev), "loop"))
	if err != nil {
		return fmt.Errorf("not a loop device: %s", dev)
	}
	if f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0); err == nil {
		err = unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.ENXIO) {
			return fmt.Errorf("LOOP_CLR_FD %s: %w", dev, err)
		}
	} else if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	for {
		_, err := ctl(unix.LOOP_CTL_REMOVE, idx)
		if err == nil || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("LOOP_CTL_REMOVE %d: %w", idx, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("LOOP_CTL_REMOVE %d: still busy: %w", idx, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
