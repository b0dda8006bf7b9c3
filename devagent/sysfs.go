package devagent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/volumed/volumed/commands"
)

// DefaultSysRoot is where sysfs is mounted.
const DefaultSysRoot = "/sys"

// sectorSize is the unit of /sys/block/X/size.
const sectorSize = 512

// nvmeNamespace matches an NVMe namespace's disk name, nvmeXnY (a
// multipath head nvmeXcYnZ included).
var nvmeNamespace = regexp.MustCompile(`^nvme[0-9]+(c[0-9]+)?n[0-9]+$`)

// ramDisk matches zram and ram devices, which are never volumes.
var ramDisk = regexp.MustCompile(`^z?ram[0-9]+$`)

// Sysfs reads whole disks from /sys/block of a sysfs tree.
type Sysfs struct {
	// Root is the sysfs mount point; empty means DefaultSysRoot.
	Root string
	// Ignore, when set, hides a disk by its kernel name or, for a
	// device-mapper disk, by its dm name.
	Ignore func(name string) bool
}

// Disks returns the disks present, sorted by name. A disk whose files
// cannot be read is left out and its error joined into the returned error;
// only an unreadable /sys/block returns no disks.
func (s Sysfs) Disks() ([]commands.Device, error) {
	present, failed, err := s.scan()
	if err != nil {
		return nil, err
	}
	out := make([]commands.Device, 0, len(present))
	for _, d := range present {
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b commands.Device) int { return strings.Compare(a.Name, b.Name) })
	var errs []error
	for _, err := range failed {
		errs = append(errs, err)
	}
	return out, errors.Join(errs...)
}

// scan reads every disk under /sys/block: the present ones by name, and the
// error of each disk that could not be read.
func (s Sysfs) scan() (present map[string]commands.Device, failed map[string]error, err error) {
	ents, err := os.ReadDir(filepath.Join(s.root(), "block"))
	if err != nil {
		return nil, nil, fmt.Errorf("devagent: read /sys/block: %w", err)
	}
	present = make(map[string]commands.Device, len(ents))
	failed = map[string]error{}
	for _, e := range ents {
		d, ok, err := s.Disk(e.Name())
		switch {
		case err != nil:
			failed[e.Name()] = err
		case ok:
			present[d.Name] = d
		}
	}
	return present, failed, nil
}

// Disk reads one disk by kernel name. It returns false, without error, for
// a disk that is absent, ignored, a zram/ram device, or of size 0 (not yet
// present: loop, nbd and dm devices appear empty and get their size later).
// Identity fields are set where the kernel shows them: the virtio serial,
// the SCSI WWID, a loop device's backing file, an NVMe namespace's
// controller serial, WWID, NGUID and EUI-64, and the kernel's diskseq.
func (s Sysfs) Disk(name string) (commands.Device, bool, error) {
	if name == "" || strings.ContainsAny(name, "/") || name == "." || name == ".." || ramDisk.MatchString(name) {
		return commands.Device{}, false, nil
	}
	dir := filepath.Join(s.root(), "block", name)
	dmName, err := readOptional(filepath.Join(dir, "dm", "name"))
	if err != nil {
		return commands.Device{}, false, err
	}
	if s.Ignore != nil && (s.Ignore(name) || (dmName != "" && s.Ignore(dmName))) {
		return commands.Device{}, false, nil
	}
	devNum, err := readOptional(filepath.Join(dir, "dev"))
	if err != nil || devNum == "" {
		return commands.Device{}, false, err
	}
	sectors, err := readOptional(filepath.Join(dir, "size"))
	if err != nil || sectors == "" || sectors == "0" {
		return commands.Device{}, false, err
	}
	d := commands.Device{Name: name, Path: "/dev/" + strings.ReplaceAll(name, "!", "/")}
	if d.Major, d.Minor, err = parseDevNum(devNum); err != nil {
		return commands.Device{}, false, fmt.Errorf("devagent: %s/dev: %w", name, err)
	}
	n, err := strconv.ParseInt(sectors, 10, 64)
	if err != nil || n < 0 || n > (1<<63-1)/sectorSize {
		return commands.Device{}, false, fmt.Errorf("devagent: %s/size %q: bad sector count", name, sectors)
	}
	d.Size = n * sectorSize
	// virtio: serial; SCSI: device/wwid; NVMe namespace: wwid, nguid,
	// eui and the serial of its controller (device/serial).
	for _, f := range []struct {
		dst  *string
		path string
	}{
		{&d.Serial, filepath.Join(dir, "serial")},
		{&d.WWID, filepath.Join(dir, "device", "wwid")},
		{&d.BackingFile, filepath.Join(dir, "loop", "backing_file")},
	} {
		if *f.dst, err = readOptional(f.path); err != nil {
			return commands.Device{}, false, err
		}
	}
	if nvmeNamespace.MatchString(name) {
		for _, f := range []struct {
			dst  *string
			path string
		}{
			{&d.Serial, filepath.Join(dir, "device", "serial")},
			{&d.WWID, filepath.Join(dir, "wwid")},
			{&d.NGUID, filepath.Join(dir, "nguid")},
			{&d.EUI, filepath.Join(dir, "eui")},
		} {
			if *f.dst != "" {
				continue
			}
			if *f.dst, err = readOptional(f.path); err != nil {
				return commands.Device{}, false, err
			}
		}
	}
	seq, err := readOptional(filepath.Join(dir, "diskseq"))
	if err != nil {
		return commands.Device{}, false, err
	}
	if seq != "" {
		if d.DiskSeq, err = strconv.ParseUint(seq, 10, 64); err != nil {
			return commands.Device{}, false, fmt.Errorf("devagent: %s/diskseq %q: %w", name, seq, err)
		}
	}
	if d.Controller, err = controller(dir, name); err != nil {
		return commands.Device{}, false, err
	}
	return d, true, nil
}

func (s Sysfs) root() string {
	if s.Root == "" {
		return DefaultSysRoot
	}
	return s.Root
}

// controller names what the disk hangs on: the base name of its device
// link (e.g. "virtio4", or "2:0:0:0" for SCSI), else the driver prefix of a
// virtual disk's name ("loop", "nbd", "dm").
func controller(dir, name string) (string, error) {
	target, err := os.Readlink(filepath.Join(dir, "device"))
	switch {
	case err == nil:
		return filepath.Base(target), nil
	case !errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("devagent: %w", err)
	}
	return strings.TrimRight(name, "-0123456789"), nil
}

// readOptional returns the trimmed content of a sysfs attribute, or "" if
// it does not exist.
func readOptional(path string) (string, error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		return strings.TrimSpace(string(b)), nil
	case errors.Is(err, fs.ErrNotExist):
		return "", nil
	}
	return "", fmt.Errorf("devagent: %w", err)
}

// parseDevNum parses "MAJOR:MINOR".
func parseDevNum(s string) (major, minor int, err error) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not MAJOR:MINOR", s)
	}
	if major, err = strconv.Atoi(a); err != nil {
		return 0, 0, fmt.Errorf("major: %w", err)
	}
	if minor, err = strconv.Atoi(b); err != nil {
		return 0, 0, fmt.Errorf("minor: %w", err)
	}
	return major, minor, nil
}
