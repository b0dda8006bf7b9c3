package devagent

import (
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

// DeviceMapperAvailable reports whether linear device-mapper devices could
// be made here: /dev/mapper/control exists and dmsetup is on PATH. It is
// false on this project's machines (no dm in the kernel).
func DeviceMapperAvailable() bool {
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		return false
	}
	_, err := exec.LookPath("dmsetup")
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
func (n *Namer) Ensure(name, devicePath string) (string, error) {
	if !IsPersistentName(name) {
		return "", fmt.Errorf("%w: %q", ErrInvalidName, name)
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
func (n *Namer) Remove(name string) error {
	if !IsPersistentName(name) {
		return fmt.Errorf("%w: %q", ErrInvalidName, name)
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
func (n *Namer) List() (map[string]string, error) {
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
