package nbd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrNotBlockOrFile reports an export path that is neither a block device
// nor a regular file.
var ErrNotBlockOrFile = errors.New("nbd: export path is neither a block device nor a regular file")

// ErrNotDevice reports an export path that is not the block device its
// spec names (ExportSpec.Device): a symlink, a file or another device.
var ErrNotDevice = errors.New("nbd: export path is not the expected block device")

// backing is the opened device or file behind one export. Its methods are
// safe for concurrent use: they are positional reads and writes on one fd.
type backing struct {
	f     *os.File
	block bool // a block device, not a regular file
	trim  bool // discard works here: BLKDISCARD or FALLOC_FL_PUNCH_HOLE
}

// openBacking opens path read-write, or read-only, and finds out whether
// it can discard. With dev not 0, path must be block device dev itself: it
// is opened with O_NOFOLLOW and checked on the open descriptor.
func openBacking(path string, readOnly bool, dev uint64) (*backing, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	if dev != 0 {
		flags |= unix.O_NOFOLLOW
	}
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("nbd: open export: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("nbd: stat %s: %w", path, err)
	}
	if dev != 0 && (st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != dev) {
		f.Close()
		return nil, fmt.Errorf("nbd: %s: %w", path, ErrNotDevice)
	}
	b := &backing{f: f}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		b.block = true
		b.trim = !readOnly && blockDiscards(st.Rdev)
	case unix.S_IFREG:
		b.trim = !readOnly && fileDiscards(f)
	default:
		f.Close()
		return nil, fmt.Errorf("nbd: %s: %w", path, ErrNotBlockOrFile)
	}
	return b, nil
}

// size is the current size in bytes: BLKGETSIZE64 for a block device, the
// file size otherwise. It is read per connection, so a resized volume is
// seen by the next client.
func (b *backing) size() (uint64, error) {
	if b.block {
		var n uint64
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, b.f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n)))
		if errno != 0 {
			return 0, fmt.Errorf("nbd: BLKGETSIZE64 %s: %w", b.f.Name(), errno)
		}
		return n, nil
	}
	fi, err := b.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("nbd: %w", err)
	}
	return uint64(fi.Size()), nil
}

// discard drops the range [off, off+n): BLKDISCARD or a punched hole.
func (b *backing) discard(off, n uint64) error {
	if b.block {
		r := [2]uint64{off, n}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, b.f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r)))
		if errno != 0 {
			return errno
		}
		return nil
	}
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// sync flushes written data to stable storage.
func (b *backing) sync() error { return unix.Fdatasync(int(b.f.Fd())) }

// close releases the file descriptor.
func (b *backing) close() error { return b.f.Close() }

// blockDiscards reports whether the block device dev advertises discard
// (queue/discard_max_bytes > 0; a partition uses its disk's queue).
func blockDiscards(dev uint64) bool {
	dir := filepath.Join("/sys/dev/block", strconv.FormatUint(uint64(unix.Major(dev)), 10)+":"+strconv.FormatUint(uint64(unix.Minor(dev)), 10))
	for _, q := range []string{"queue", "../queue"} {
		raw, err := os.ReadFile(filepath.Join(dir, q, "discard_max_bytes"))
		if err != nil {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64)
		return err == nil && n > 0
	}
	return false
}

// fileDiscards probes FALLOC_FL_PUNCH_HOLE without touching data: a hole
// punched at the end of the file is a no-op where the file system supports
// it, and EOPNOTSUPP where it does not.
func fileDiscards(f *os.File) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, fi.Size(), 1) == nil
}
