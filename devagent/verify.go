package devagent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/commands"
)

// ErrNotThatDisk is returned by CheckLocal for a disk that is not, or no
// longer, the one named.
var ErrNotThatDisk = errors.New("devagent: not the recorded disk")

// CheckLocal checks, on this host, that id is a present disk: the block
// device numbered id.Major:id.Minor in sysRoot (empty: DefaultSysRoot) is
// named id.Name and has id.DiskSeq, and devRoot/<name> (empty: "/dev") is
// that block device itself, not a symlink or a file. An agent's word is
// never taken for it. Without a diskseq (kernels before 5.15) only the
// name and device number can be checked here.
func CheckLocal(sysRoot, devRoot string, id commands.DeviceIdentity) error {
	if sysRoot == "" {
		sysRoot = DefaultSysRoot
	}
	if devRoot == "" {
		devRoot = "/dev"
	}
	num := strconv.Itoa(id.Major) + ":" + strconv.Itoa(id.Minor)
	link, err := os.Readlink(filepath.Join(sysRoot, "dev", "block", num))
	if err != nil {
		return fmt.Errorf("%w: no block device %s: %w", ErrNotThatDisk, num, err)
	}
	if name := filepath.Base(link); name != id.Name {
		return fmt.Errorf("%w: block device %s is %s, not %s", ErrNotThatDisk, num, name, id.Name)
	}
	seq, err := readOptional(filepath.Join(sysRoot, "block", id.Name, "diskseq"))
	if err != nil {
		return err
	}
	if seq != strconv.FormatUint(id.DiskSeq, 10) && (seq != "" || id.DiskSeq != 0) {
		return fmt.Errorf("%w: %s has diskseq %q, not %d", ErrNotThatDisk, id.Name, seq, id.DiskSeq)
	}
	node := filepath.Join(devRoot, filepath.FromSlash(id.Path()[len("/dev/"):]))
	var st unix.Stat_t
	if err := unix.Lstat(node, &st); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrNotThatDisk, node, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != unix.Mkdev(uint32(id.Major), uint32(id.Minor)) {
		return fmt.Errorf("%w: %s is not block device %s", ErrNotThatDisk, node, num)
	}
	return nil
}

// CheckVolume checks, on this host, that the disk name in sysRoot (empty:
// DefaultSysRoot), if present, does not carry another volume's kernel
// identity than volumeID's (MatchesVolume). A diskseq starts again at each
// boot, and without one (kernels before 5.15) CheckLocal checks only the
// name and number, so a disk that passes CheckLocal may still be another
// volume's; a disk without identity cannot be told apart here.
func CheckVolume(sysRoot, name, volumeID string) error {
	d, ok, err := Sysfs{Root: sysRoot}.Disk(name)
	if err != nil {
		return err
	}
	if ok && HasIdentity(d) && !MatchesVolume(d, volumeID) {
		return fmt.Errorf("%w: %s carries another volume's identity than %s's", ErrNotThatDisk, name, volumeID)
	}
	return nil
}
