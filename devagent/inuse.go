package devagent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/commands"
)

// DefaultProcRoot is where procfs is mounted.
const DefaultProcRoot = "/proc"

// Usage finds who uses a disk on this host: a mount of it or of one of
// its partitions, a dm or md device over it, or a process other than
// Self holding it open.
type Usage struct {
	// SysRoot and ProcRoot are where sysfs and procfs are; empty: the
	// host's.
	SysRoot, ProcRoot string
	// Self is the pid whose open files do not count (this process: the
	// agent, and with it the NBD server of a volumed), nor those of any
	// process running the same executable (a volumed serving NBD beside a
	// separate agent); 0 counts every process.
	Self int
}

// node is a block device node: the disk or one of its partitions.
type node struct {
	name string
	num  string // "MAJOR:MINOR"
}

// path is the node's /dev path.
func (n node) path() string { return "/dev/" + strings.ReplaceAll(n.name, "!", "/") }

// Users lists who uses disk name (a kernel name), in the order mounts,
// holders, processes. aliases are more paths that name the disk (its
// persistent name), matched as an open file's target. Processes that end
// while they are read are skipped.
func (u Usage) Users(name string, aliases ...string) ([]commands.DeviceUser, error) {
	nodes, err := u.nodes(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(u.procRoot(), "self", "mountinfo"))
	if err != nil {
		return nil, fmt.Errorf("devagent: %w", err)
	}
	mounts, err := ParseMountinfo(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	users := mountUsers(mounts, nodes)
	held, err := u.holders(name, nodes)
	if err != nil {
		return nil, err
	}
	users = append(users, held...)
	open, err := u.openers(nodes, aliases)
	if err != nil {
		return nil, err
	}
	return append(users, open...), nil
}

// nodes reads the disk's node and its partitions' (a directory
// /sys/block/<disk>/<part> with a partition file), disk first.
func (u Usage) nodes(name string) ([]node, error) {
	if name == "" || strings.ContainsAny(name, "/") || name == "." || name == ".." {
		return nil, fmt.Errorf("devagent: bad disk name %q", name)
	}
	dir := filepath.Join(u.sysRoot(), "block", name)
	num, err := readOptional(filepath.Join(dir, "dev"))
	if err != nil {
		return nil, err
	}
	if num == "" {
		return nil, fmt.Errorf("devagent: disk %s: %w", name, fs.ErrNotExist)
	}
	out := []node{{name: name, num: num}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("devagent: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), name) {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, e.Name(), "partition")); err != nil {
			continue
		}
		pnum, err := readOptional(filepath.Join(dir, e.Name(), "dev"))
		if err != nil {
			return nil, err
		}
		if pnum != "" {
			out = append(out, node{name: e.Name(), num: pnum})
		}
	}
	return out, nil
}

// Mount is one line of /proc/<pid>/mountinfo.
type Mount struct {
	// Dev is the st_dev of the mount's filesystem, "MAJOR:MINOR".
	Dev string
	// MountPoint is where it is mounted, unescaped.
	MountPoint string
	// FSType is the filesystem type.
	FSType string
	// Source is the mount source (a device path, or e.g. "tmpfs").
	Source string
}

// ParseMountinfo reads a mountinfo file (proc(5)): mount id, parent id,
// MAJOR:MINOR, root, mount point, options, optional fields up to "-",
// filesystem type, source, super options; octal escapes (\040) are
// undone.
func ParseMountinfo(r io.Reader) ([]Mount, error) {
	var out []Mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		if len(f) < 6 || sep < 6 || sep+2 >= len(f) {
			return nil, fmt.Errorf("devagent: mountinfo line %d: %q is not a mount", n, line)
		}
		out = append(out, Mount{Dev: f[2], MountPoint: unescapeMount(f[4]), FSType: f[sep+1], Source: unescapeMount(f[sep+2])})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("devagent: mountinfo: %w", err)
	}
	return out, nil
}

// unescapeMount undoes the kernel's octal escapes of space, tab, newline
// and backslash (\040, \011, \012, \134).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountUsers lists the mounts of nodes: by device number, or by source
// path where the filesystem shows another number (btrfs).
func mountUsers(mounts []Mount, nodes []node) []commands.DeviceUser {
	var out []commands.DeviceUser
	for _, m := range mounts {
		for _, n := range nodes {
			if m.Dev == n.num || m.Source == n.path() {
				out = append(out, commands.DeviceUser{Kind: commands.UserMount, Device: n.path(), MountPoint: m.MountPoint})
				break
			}
		}
	}
	return out
}

// holders lists the dm or md devices over the disk or its partitions
// (/sys/block/<disk>/holders, /sys/block/<disk>/<part>/holders), named
// with their dm name where they have one.
func (u Usage) holders(disk string, nodes []node) ([]commands.DeviceUser, error) {
	var out []commands.DeviceUser
	for _, n := range nodes {
		dir := filepath.Join(u.sysRoot(), "block", disk)
		if n.name != disk {
			dir = filepath.Join(dir, n.name)
		}
		ents, err := os.ReadDir(filepath.Join(dir, "holders"))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("devagent: %w", err)
		}
		for _, e := range ents {
			holder := e.Name()
			if dm, _ := readOptional(filepath.Join(u.sysRoot(), "block", holder, "dm", "name")); dm != "" {
				holder += " (" + dm + ")"
			}
			out = append(out, commands.DeviceUser{Kind: commands.UserHolder, Device: n.path(), Holder: holder})
		}
	}
	return out, nil
}

// openers lists the processes other than Self with one of nodes open: an
// fd whose link names a node's path or an alias, or, under /dev, a block
// device of a node's number.
func (u Usage) openers(nodes []node, aliases []string) ([]commands.DeviceUser, error) {
	byPath := map[string]string{}
	byNum := map[uint64]string{}
	for _, n := range nodes {
		byPath[n.path()] = n.path()
		if maj, min, err := parseDevNum(n.num); err == nil {
			byNum[unix.Mkdev(uint32(maj), uint32(min))] = n.path()
		}
	}
	for _, a := range aliases {
		byPath[a] = nodes[0].path()
	}
	procs, err := os.ReadDir(u.procRoot())
	if err != nil {
		return nil, fmt.Errorf("devagent: %w", err)
	}
	var out []commands.DeviceUser
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid <= 0 || pid == u.Self {
			continue
		}
		fdDir := filepath.Join(u.procRoot(), p.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // ended, or not ours to read
		}
		seen := map[string]bool{}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil {
				continue
			}
			dev, ok := byPath[target]
			if !ok && strings.HasPrefix(target, "/dev/") {
				// Another name of the node under /dev (dm, by-id): its
				// number. /dev is devtmpfs: the stat never blocks.
				var st unix.Stat_t
				if unix.Stat(filepath.Join(fdDir, fd.Name()), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
					dev, ok = byNum[st.Rdev]
				}
			}
			if !ok || seen[dev] || u.sameProgram(p.Name()) {
				continue
			}
			seen[dev] = true
			comm, _ := readOptional(filepath.Join(u.procRoot(), p.Name(), "comm"))
			out = append(out, commands.DeviceUser{Kind: commands.UserProcess, Device: dev, PID: pid, Command: comm})
		}
	}
	return out, nil
}

// sameProgram reports whether process pid runs Self's executable.
func (u Usage) sameProgram(pid string) bool {
	if u.Self <= 0 {
		return false
	}
	self, err := os.Stat(filepath.Join(u.procRoot(), strconv.Itoa(u.Self), "exe"))
	if err != nil {
		return false
	}
	exe, err := os.Stat(filepath.Join(u.procRoot(), pid, "exe"))
	return err == nil && os.SameFile(self, exe)
}

func (u Usage) sysRoot() string {
	if u.SysRoot == "" {
		return DefaultSysRoot
	}
	return u.SysRoot
}

func (u Usage) procRoot() string {
	if u.ProcRoot == "" {
		return DefaultProcRoot
	}
	return u.ProcRoot
}
