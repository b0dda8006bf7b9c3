package nbd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	// ErrNotBlockOrFile reports an export path that is neither a block
	// device nor a regular file.
	ErrNotBlockOrFile = errors.New("nbd: export path is neither a block device nor a regular file")
	// ErrWrongDevice reports an export path that, once opened, is not the
	// block device ExportSpec.Device names.
	ErrWrongDevice = errors.New("nbd: export path is not the expected block device")
)

// loopMajor is the block major number of loop devices.
const loopMajor = 7

// backing is the opened device or file behind one export. Its methods are
// safe for concurrent use: they are positional calls on one fd.
type backing struct {
	f     *os.File
	block bool // a block device, not a regular file
	trim  bool // discard works here: BLKDISCARD or FALLOC_FL_PUNCH_HOLE
	// fastZeroFill: zeroing without unmapping is fast (fallocate on a
	// file; a block device whose queue offloads write-zeroes).
	fastZeroFill bool
	// seek is where SEEK_DATA/SEEK_HOLE answer for the export: the file
	// itself, a loop device's backing file (at seekOff), or nil when
	// every block is reported as data.
	seek    *os.File
	seekOff int64
}

// openBacking opens the export's path read-write, or read-only: symlinks
// (persistent names) are resolved first and the target is opened with
// O_NOFOLLOW, then checked on the open descriptor: a block device with
// rdev sp.Device and diskseq sp.DiskSeq when they are set, else a block
// device or regular file.
func openBacking(sp ExportSpec) (*backing, error) {
	path, err := filepath.EvalSymlinks(sp.Path)
	if err != nil {
		return nil, fmt.Errorf("nbd: open export: %w", err)
	}
	flags := os.O_RDWR
	if sp.ReadOnly {
		flags = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("nbd: open export: %w", err)
	}
	b, err := inspect(f, sp)
	if err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

// inspect checks what f is and finds out what it supports.
func inspect(f *os.File, sp ExportSpec) (*backing, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("nbd: stat %s: %w", f.Name(), err)
	}
	b := &backing{f: f}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		b.block = true
		if sp.Device != 0 && st.Rdev != sp.Device {
			return nil, fmt.Errorf("nbd: %s is %d:%d, want %d:%d: %w", f.Name(), unix.Major(st.Rdev), unix.Minor(st.Rdev),
				unix.Major(sp.Device), unix.Minor(sp.Device), ErrWrongDevice)
		}
		if err := checkDiskSeq(f, sp.DiskSeq); err != nil {
			return nil, err
		}
		b.trim = !sp.ReadOnly && queueAttr(st.Rdev, "discard_max_bytes") > 0
		b.fastZeroFill = queueAttr(st.Rdev, "write_zeroes_max_bytes") > 0
		if unix.Major(st.Rdev) == loopMajor {
			b.seek, b.seekOff = loopBacking(f, st.Rdev)
		}
	case unix.S_IFREG:
		if sp.Device != 0 {
			return nil, fmt.Errorf("nbd: %s is a regular file: %w", f.Name(), ErrWrongDevice)
		}
		b.trim = !sp.ReadOnly && fileDiscards(f)
		b.fastZeroFill = true
		b.seek = f
	default:
		return nil, fmt.Errorf("nbd: %s: %w", f.Name(), ErrNotBlockOrFile)
	}
	return b, nil
}

// checkDiskSeq checks that the block device open as f has the kernel's
// diskseq want (0: any). A kernel without BLKGETDISKSEQ (before 5.15)
// cannot tell: it passes.
func checkDiskSeq(f *os.File, want uint64) error {
	if want == 0 {
		return nil
	}
	var seq uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETDISKSEQ, uintptr(unsafe.Pointer(&seq)))
	switch {
	case errno == unix.ENOTTY || errno == unix.EINVAL:
		return nil
	case errno != 0:
		return fmt.Errorf("nbd: BLKGETDISKSEQ %s: %w", f.Name(), errno)
	case seq != want:
		return fmt.Errorf("nbd: %s has diskseq %d, want %d: %w", f.Name(), seq, want, ErrWrongDevice)
	}
	return nil
}

// loopBacking opens the backing file of a loop device for SEEK_DATA, at
// the loop's offset. It is the file named in /sys/block/loopN/loop/
// backing_file only if its device and inode are the ones the loop driver
// reports (LOOP_GET_STATUS64); otherwise nil (all data is reported).
func loopBacking(f *os.File, rdev uint64) (*os.File, int64) {
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return nil, 0
	}
	raw, err := os.ReadFile(filepath.Join(sysDev(rdev), "loop", "backing_file"))
	if err != nil {
		return nil, 0
	}
	bf, err := os.OpenFile(strings.TrimSuffix(string(raw), "\n"), os.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, 0
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(bf.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG ||
		st.Dev != info.Device || st.Ino != info.Inode {
		bf.Close()
		return nil, 0
	}
	return bf, int64(info.Offset)
}

// sysDev is the /sys/dev/block directory of a block device.
func sysDev(rdev uint64) string {
	return filepath.Join("/sys/dev/block", strconv.FormatUint(uint64(unix.Major(rdev)), 10)+":"+strconv.FormatUint(uint64(unix.Minor(rdev)), 10))
}

// queueAttr reads a numeric queue attribute of a block device (a partition
// uses its disk's queue); 0 when it cannot be read.
func queueAttr(rdev uint64, name string) uint64 {
	for _, q := range []string{"queue", "../queue"} {
		raw, err := os.ReadFile(filepath.Join(sysDev(rdev), q, name))
		if err != nil {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64)
		if err != nil {
			return 0
		}
		return n
	}
	return 0
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

// fd is the backing descriptor.
func (b *backing) fd() int { return int(b.f.Fd()) }

// writeAt writes p at off; with fua the data is on stable storage when it
// returns (RWF_DSYNC: only this write, not the whole device, is synced).
func (b *backing) writeAt(p []byte, off int64, fua bool) error {
	flags := 0
	if fua {
		flags = unix.RWF_DSYNC
	}
	for len(p) > 0 {
		n, err := unix.Pwritev2(b.fd(), [][]byte{p}, off, flags)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
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
	return unix.Fallocate(b.fd(), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// errSlowZero reports a fast zero that cannot be done fast.
var errSlowZero = errors.New("nbd: zeroing would not be faster than writing")

// zero makes [off, off+n) read as zeroes. Unless noHole, it may deallocate
// (a punched hole on a file; on a block device fallocate PUNCH_HOLE,
// which unmaps only where the device guarantees zeroes, as BLKZEROOUT
// without fallback). With noHole the range stays allocated (ZERO_RANGE,
// BLKZEROOUT). With fast it fails with errSlowZero, changing nothing,
// where only writing zeroes would do.
func (b *backing) zero(off, n uint64, noHole, fast bool) error {
	o, l := int64(off), int64(n)
	const punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	if !noHole && unix.Fallocate(b.fd(), punch, o, l) == nil {
		return nil
	}
	if b.block {
		if fast && !b.fastZeroFill {
			return errSlowZero
		}
		if unix.Fallocate(b.fd(), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, o, l) == nil {
			return nil
		}
		r := [2]uint64{off, n}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, b.f.Fd(), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&r))); errno == 0 {
			return nil
		}
	} else {
		if unix.Fallocate(b.fd(), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, o, l) == nil {
			return nil
		}
		// tmpfs has no ZERO_RANGE: punch, then allocate again.
		if unix.Fallocate(b.fd(), punch, o, l) == nil && unix.Fallocate(b.fd(), unix.FALLOC_FL_KEEP_SIZE, o, l) == nil {
			return nil
		}
	}
	if fast {
		return errSlowZero
	}
	return b.writeZeroes(o, l)
}

// zeroes is one shared, never written chunk of zero bytes, so zeroing by
// writing needs no buffer per request.
var zeroes = sync.OnceValue(func() []byte { return make([]byte, chunkSize) })

// writeZeroes writes zero bytes over [off, off+n), a chunk at a time.
func (b *backing) writeZeroes(off, n int64) error {
	z := zeroes()
	for n > 0 {
		k := min(n, int64(len(z)))
		if err := b.writeAt(z[:k], off, false); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// cache asks the kernel to read [off, off+n) ahead (NBD_CMD_CACHE).
func (b *backing) cache(off, n uint64) error {
	return unix.Fadvise(b.fd(), int64(off), int64(n), unix.FADV_WILLNEED)
}

// extent is one block-status descriptor.
type extent struct {
	length uint32
	flags  uint32
}

// extents describes [off, off+n) for base:allocation: holes (read as
// zeroes) and data, at most maxExtents descriptors covering a prefix of
// the range. Without a seekable backing it is one data extent.
func (b *backing) extents(off uint64, n uint32) ([]extent, error) {
	if b.seek == nil {
		return []extent{{length: n}}, nil
	}
	if b.block {
		// Data written through the loop device may still sit in the
		// device's page cache: write the range out to the backing file
		// (no device flush) so SEEK_DATA sees it.
		if err := unix.SyncFileRange(b.fd(), int64(off), int64(n),
			unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
			return nil, fmt.Errorf("nbd: sync_file_range: %w", err)
		}
	}
	fd := int(b.seek.Fd())
	pos, end := int64(off)+b.seekOff, int64(off)+int64(n)+b.seekOff
	var out []extent
	add := func(to int64, flags uint32) {
		to = min(to, end)
		if k := len(out); k > 0 && out[k-1].flags == flags {
			out[k-1].length += uint32(to - pos)
		} else {
			out = append(out, extent{length: uint32(to - pos), flags: flags})
		}
		pos = to
	}
	for pos < end && len(out) < maxExtents {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO): // a hole to the end of the file
			add(end, stateHole|stateZero)
			continue
		case err != nil: // no SEEK_DATA here: all data
			if len(out) == 0 {
				return []extent{{length: n}}, nil
			}
			add(end, 0)
			continue
		case data > pos:
			add(data, stateHole|stateZero)
			continue
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil || hole <= pos {
			hole = end
		}
		add(hole, 0)
	}
	return out, nil
}

// sync flushes written data to stable storage.
func (b *backing) sync() error { return unix.Fdatasync(b.fd()) }

// close releases the file descriptors.
func (b *backing) close() error {
	var err error
	if b.seek != nil && b.seek != b.f {
		err = b.seek.Close()
	}
	return errors.Join(b.f.Close(), err)
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
