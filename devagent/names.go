package devagent

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// DefaultNameDir is where the Namer puts its symlinks.
const DefaultNameDir = "/dev/disk/by-volume"

// persistentName is the form of a persistent device name.
var persistentName = regexp.MustCompile(`^vol[0-9a-f]{8}$`)

// ErrInvalidName is returned for a name that is not vol + 8 hex digits.
var ErrInvalidName = errors.New("devagent: invalid persistent name")

// ErrNotSymlink is returned when a path the Namer would use holds something
// other than a symlink; it is left alone.
var ErrNotSymlink = errors.New("devagent: not a symlink")

// PersistentName is the persistent device name of a volume: "vol" and the
// first 8 hex characters of its UUID, lower case. The result is only valid
// (IsPersistentName) for a UUID.
func PersistentName(volumeUUID string) string {
	s := strings.ToLower(strings.ReplaceAll(volumeUUID, "-", ""))
	if len(s) > 8 {
		s = s[:8]
	}
	return "vol" + s
}

// IsPersistentName reports whether name has the form ^vol[0-9a-f]{8}$.
func IsPersistentName(name string) bool { return persistentName.MatchString(name) }

// checkName returns ErrInvalidName for a name that is not IsPersistentName.
func checkName(name string) error {
	if !IsPersistentName(name) {
		return fmt.Errorf("%w: %q", ErrInvalidName, name)
	}
	return nil
}

// Names keeps the persistent names of one VM's attached volumes. Callers
// serialize changes to one name.
type Names interface {
	// Ensure makes name refer to devicePath, replacing a name that refers
	// elsewhere, and returns the path of the name.
	Ensure(ctx context.Context, name, devicePath string) (string, error)
	// Remove deletes the name; an absent name is not an error.
	Remove(ctx context.Context, name string) error
	// List returns every persistent name held: name → device path.
	List(ctx context.Context) (map[string]string, error)
	// Dir is the directory the names appear in.
	Dir() string
}

var (
	_ Names = (*Namer)(nil)
	_ Names = (*DMNamer)(nil)
)

// NewNames returns a DMNamer running dmsetup (empty: "dmsetup" from PATH)
// where DeviceMapperAvailable(dmsetup), else a symlink Namer on dir.
func NewNames(dir, dmsetup string) Names {
	if DeviceMapperAvailable(dmsetup) {
		return NewDMNamer(dmsetup, "")
	}
	return NewNamer(dir)
}

// DeviceMapperAvailable reports whether linear device-mapper devices could
// be made here: /dev/mapper/control exists and dmsetup (empty: "dmsetup"
// from PATH) is executable. It is false on this project's machines (no dm
// in the kernel).
func DeviceMapperAvailable(dmsetup string) bool {
	if _, err := os.Stat(dmControl); err != nil {
		return false
	}
	_, err := exec.LookPath(cmp.Or(dmsetup, defaultDmsetup))
	return err == nil
}

// Namer gives attached volumes persistent names as symlinks
// Dir/volXXXXXXXX pointing at the device. Its methods are safe for
// concurrent use on distinct names.
type Namer struct {
	dir string
}

// NewNamer returns a Namer on dir; empty means DefaultNameDir.
func NewNamer(dir string) *Namer {
	if dir == "" {
		dir = DefaultNameDir
	}
	return &Namer{dir: dir}
}

// Dir is the directory holding the symlinks.
func (n *Namer) Dir() string { return n.dir }

// Ensure makes Dir/name a symlink to devicePath (absolute) and returns the
// symlink's path. It is idempotent, and atomically replaces a symlink
// pointing elsewhere; a non-symlink in the way fails with ErrNotSymlink.
// The symlink calls do not block: ctx is not used.
func (n *Namer) Ensure(_ context.Context, name, devicePath string) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	if !filepath.IsAbs(devicePath) {
		return "", fmt.Errorf("devagent: device path %q is not absolute", devicePath)
	}
	link := filepath.Join(n.dir, name)
	target, err := readSymlink(link)
	switch {
	case err == nil && target == devicePath:
		return link, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return "", err
	}
	if err := os.MkdirAll(n.dir, 0o755); err != nil {
		return "", fmt.Errorf("devagent: %w", err)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(n.dir, "."+name+"."+hex.EncodeToString(rnd[:]))
	if err := os.Symlink(devicePath, tmp); err != nil {
		return "", fmt.Errorf("devagent: %w", err)
	}
	if err := os.Rename(tmp, link); err != nil {
		_ = os.Remove(tmp)
		return "", fmt.Errorf("devagent: %w", err)
	}
	return link, nil
}

// Remove deletes the symlink Dir/name; a missing one is not an error.
func (n *Namer) Remove(_ context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	link := filepath.Join(n.dir, name)
	if _, err := readSymlink(link); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	if err := os.Remove(link); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("devagent: %w", err)
	}
	return nil
}

// List returns the persistent-name symlinks in Dir: name → target. A
// missing Dir is an empty list; other entries are skipped.
func (n *Namer) List(context.Context) (map[string]string, error) {
	ents, err := os.ReadDir(n.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("devagent: %w", err)
	}
	out := make(map[string]string, len(ents))
	for _, e := range ents {
		if !IsPersistentName(e.Name()) || e.Type()&fs.ModeSymlink == 0 {
			continue
		}
		target, err := os.Readlink(filepath.Join(n.dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("devagent: %w", err)
		}
		out[e.Name()] = target
	}
	return out, nil
}

// readSymlink returns the target of the symlink at link, ErrNotSymlink if
// something else is there, or an error wrapping fs.ErrNotExist.
func readSymlink(link string) (string, error) {
	fi, err := os.Lstat(link)
	if err != nil {
		return "", fmt.Errorf("devagent: %w", err)
	}
	if fi.Mode()&fs.ModeSymlink == 0 {
		return "", fmt.Errorf("%w: %s", ErrNotSymlink, link)
	}
	target, err := os.Readlink(link)
	if err != nil {
		return "", fmt.Errorf("devagent: %w", err)
	}
	return target, nil
}

// Device-mapper defaults.
const (
	// DMDir is where device-mapper devices appear.
	DMDir          = "/dev/mapper"
	dmControl      = DMDir + "/control"
	defaultDmsetup = "dmsetup"
	// dmsetupTimeout bounds one dmsetup run.
	dmsetupTimeout = 30 * time.Second
)

// ErrNotDisk is returned by DMNamer.Ensure for a device path that is not
// /dev/<kernel name> of a present disk.
var ErrNotDisk = errors.New("devagent: not a present disk")

// DMNamer gives attached volumes persistent names as linear device-mapper
// devices /dev/mapper/volXXXXXXXX spanning the whole device, made and
// removed with dmsetup, run with an argument list (never through a shell).
// The tables name devices as MAJOR:MINOR, the form dmsetup prints.
//
// Only a fake dmsetup exercises it in this project's tests: the kernels
// here have no device-mapper, so the real dm path is untested.
type DMNamer struct {
	dmsetup string
	sysfs   Sysfs
}

// NewDMNamer returns a DMNamer running dmsetup (empty: "dmsetup" from
// PATH) and reading device sizes from the sysfs at sysRoot (empty:
// DefaultSysRoot).
func NewDMNamer(dmsetup, sysRoot string) *DMNamer {
	return &DMNamer{dmsetup: cmp.Or(dmsetup, defaultDmsetup), sysfs: Sysfs{Root: sysRoot}}
}

// Dir is DMDir.
func (n *DMNamer) Dir() string { return DMDir }

// Ensure makes /dev/mapper/name a linear device over all of devicePath
// (/dev/<kernel name> of a present disk) and returns its path. A device
// with that table is kept; one with another table (another device, or a
// size since changed) is reloaded and resumed in place.
func (n *DMNamer) Ensure(ctx context.Context, name, devicePath string) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	table, err := n.linearTable(devicePath)
	if err != nil {
		return "", err
	}
	tables, err := n.tables(ctx)
	if err != nil {
		return "", err
	}
	current, exists := tables[name]
	switch {
	case !exists:
		err = n.run(ctx, "create", name, "--table", table)
	case current != table:
		if err = n.run(ctx, "reload", name, "--table", table); err == nil {
			err = n.run(ctx, "resume", name)
		}
	}
	if err != nil {
		return "", err
	}
	return filepath.Join(DMDir, name), nil
}

// Remove removes the dm device name; an absent one is not an error. A
// device held open fails with dmsetup's error.
func (n *DMNamer) Remove(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	tables, err := n.tables(ctx)
	if err != nil {
		return err
	}
	if _, exists := tables[name]; !exists {
		return nil
	}
	return n.run(ctx, "remove", name)
}

// List returns the dm devices with a persistent name: name → the path of
// the disk under it, or "" when its table is not one linear target over a
// whole present disk.
func (n *DMNamer) List(ctx context.Context) (map[string]string, error) {
	tables, err := n.tables(ctx)
	if err != nil {
		return nil, err
	}
	disks, err := n.sysfs.Disks()
	if disks == nil && err != nil {
		return nil, err
	}
	byTable := make(map[string]string, len(disks))
	for _, d := range disks {
		byTable[linearTable(d)] = d.Path
	}
	out := make(map[string]string, len(tables))
	for name, table := range tables {
		out[name] = byTable[table]
	}
	return out, nil
}

// linearTable returns the table of a linear dm device over all of
// devicePath, or ErrNotDisk.
func (n *DMNamer) linearTable(devicePath string) (string, error) {
	kname, ok := strings.CutPrefix(devicePath, "/dev/")
	if !ok || strings.Contains(kname, "/") {
		return "", fmt.Errorf("%w: %q is not /dev/<kernel name>", ErrNotDisk, devicePath)
	}
	d, ok, err := n.sysfs.Disk(kname)
	if err != nil {
		return "", err
	}
	if !ok || d.Path != devicePath {
		return "", fmt.Errorf("%w: %s", ErrNotDisk, devicePath)
	}
	return linearTable(d), nil
}

// linearTable is the dm table mapping all of d: "0 <sectors> linear
// <major>:<minor> 0".
func linearTable(d commands.Device) string {
	return fmt.Sprintf("0 %d linear %d:%d 0", d.Size/sectorSize, d.Major, d.Minor)
}

// tables returns the tables of the dm devices with a persistent name, from
// `dmsetup table`: one "name: table" line per target, so a device of
// several targets has their lines joined by newlines.
func (n *DMNamer) tables(ctx context.Context) (map[string]string, error) {
	out, err := n.output(ctx, "table")
	if err != nil {
		return nil, err
	}
	tables := map[string]string{}
	for line := range strings.Lines(out) {
		name, table, ok := strings.Cut(strings.TrimSpace(line), ": ")
		if !ok || !IsPersistentName(name) {
			continue // "No devices found", or not ours
		}
		if prev, seen := tables[name]; seen {
			table = prev + "\n" + table
		}
		tables[name] = table
	}
	return tables, nil
}

// run runs dmsetup with args, discarding its output.
func (n *DMNamer) run(ctx context.Context, args ...string) error {
	_, err := n.output(ctx, args...)
	return err
}

// output runs dmsetup with args and returns its standard output; a failure
// carries its standard error.
func (n *DMNamer) output(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, dmsetupTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.dmsetup, args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("devagent: %s %s: %w: %s", n.dmsetup, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
