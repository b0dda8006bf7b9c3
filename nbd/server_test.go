package nbd

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
)

const mib = 1 << 20

// TestListShowsExactlySet: nbdinfo --list shows exactly the last set, with
// descriptions, after adds, removes and an empty set.
func TestListShowsExactlySet(t *testing.T) {
	requireTools(t, "nbdinfo")
	s := startServer(t)
	a := backingFile(t, "a.img", make([]byte, mib))
	b := backingFile(t, "b.img", make([]byte, 2*mib))
	steps := []struct {
		name  string
		specs []ExportSpec
	}{
		{"two", []ExportSpec{{Name: "vol0000000a", Path: a, Description: "disk a"}, {Name: "vol0000000b", Path: b}}},
		{"replace one", []ExportSpec{{Name: "vol0000000b", Path: b}, {Name: "vol0000000c", Path: a, ReadOnly: true}}},
		{"same again", []ExportSpec{{Name: "vol0000000b", Path: b}, {Name: "vol0000000c", Path: a, ReadOnly: true}}},
		{"empty", nil},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			setExports(t, s, st.specs...)
			got := nbdinfo(t, "--list", "nbd://"+s.Addr().String())
			if len(got) != len(st.specs) {
				t.Fatalf("nbdinfo --list: %d exports %+v, want %d", len(got), got, len(st.specs))
			}
			want := slices.Clone(st.specs)
			slices.SortFunc(want, func(x, y ExportSpec) int { return strings.Compare(x.Name, y.Name) })
			for i, w := range want {
				g := got[i]
				if g.Name != w.Name || g.ReadOnly != w.ReadOnly || g.Description != w.Description {
					t.Errorf("export %d: got %+v, want %+v", i, g, w)
				}
			}
			var names []string
			for _, e := range s.Exports() {
				names = append(names, e.Name)
			}
			for i, w := range want {
				if i >= len(names) || names[i] != w.Name {
					t.Fatalf("Exports() names %v, want %+v", names, want)
				}
			}
		})
	}
}

// TestInfo: size, read-only, trim and flush as real clients see them.
func TestInfo(t *testing.T) {
	requireTools(t, "nbdinfo")
	s := startServer(t)
	p := backingFile(t, "a.img", make([]byte, 3*mib))
	tests := []struct {
		name     string
		readOnly bool
	}{{"read-write", false}, {"read-only", true}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setExports(t, s, ExportSpec{Name: "vol00000001", Path: p, ReadOnly: tt.readOnly, Description: tt.name})
			got := nbdinfo(t, uri(s, "vol00000001"))
			if len(got) != 1 {
				t.Fatalf("nbdinfo: %+v", got)
			}
			g := got[0]
			// tmpfs and ext4 punch holes, so a writable file export trims.
			if g.Size != 3*mib || g.ReadOnly != tt.readOnly || g.CanTrim == tt.readOnly || !g.CanFlush {
				t.Errorf("nbdinfo: %+v", g)
			}
		})
	}
}

// TestUnknownExport: a client asking for an export that is not served gets
// NBD's error promptly, not a hang (run bounds every client).
func TestUnknownExport(t *testing.T) {
	requireTools(t, "nbdinfo", "qemu-img")
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "a.img", make([]byte, mib))})
	tests := []struct {
		client string
		args   []string
		want   string
	}{
		// libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
		{"nbdinfo", []string{uri(s, "vol00000002")}, "No such file or directory for export: vol00000002"},
		{"qemu-img", []string{"info", uri(s, "vol00000002")}, "Requested export not available"},
		{"nbdinfo", []string{uri(s, "")}, "No such file or directory for the default export"},
	}
	for _, tt := range tests {
		t.Run(tt.client, func(t *testing.T) {
			out, err := run(t, tt.client, tt.args...)
			if err == nil || !strings.Contains(out, tt.want) {
				t.Fatalf("%s %v: err %v, output %q; want failure with %q", tt.client, tt.args, err, out, tt.want)
			}
		})
	}
	if _, err := dialWire(t, s.Addr(), "vol00000002"); !errors.As(err, new(*optError)) || err.(*optError).typ != repErrUnknown {
		t.Fatalf("NBD_OPT_GO unknown export: %v, want NBD_REP_ERR_UNKNOWN", err)
	}
}

// TestWriteReadThroughExport: data nbdcopy and qemu-img write through a
// read-write export is in the backing file, and reads back the same.
func TestWriteReadThroughExport(t *testing.T) {
	requireTools(t, "nbdcopy", "qemu-img")
	s := startServer(t)
	backing := backingFile(t, "vol.img", make([]byte, 8*mib))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backing})
	tests := []struct {
		name  string
		write func(src string) []string
		read  func(dst string) []string
	}{
		{"nbdcopy",
			func(src string) []string { return []string{"nbdcopy", src, uri(s, "vol00000001")} },
			func(dst string) []string { return []string{"nbdcopy", uri(s, "vol00000001"), dst} }},
		{"qemu-img",
			func(src string) []string {
				return []string{"qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri(s, "vol00000001")}
			},
			func(dst string) []string {
				return []string{"qemu-img", "convert", "-f", "raw", "-O", "raw", uri(s, "vol00000001"), dst}
			}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := pattern(8*mib, byte(i+1))
			src := backingFile(t, "src.img", data)
			w := tt.write(src)
			mustRun(t, w[0], w[1:]...)
			fileEquals(t, backing, data)
			dst := filepath.Join(t.TempDir(), "dst.img")
			r := tt.read(dst)
			mustRun(t, r[0], r[1:]...)
			fileEquals(t, dst, data)
		})
	}
}

// TestReadOnlyRefusesWrites: a read-only export refuses writes from real
// clients and, on the wire, with EPERM; the backing file is unchanged.
func TestReadOnlyRefusesWrites(t *testing.T) {
	requireTools(t, "nbdcopy", "qemu-io")
	s := startServer(t)
	orig := pattern(mib, 7)
	backing := backingFile(t, "vol.img", orig)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backing, ReadOnly: true})
	src := backingFile(t, "src.img", pattern(mib, 9))
	tests := []struct {
		name string
		args []string
	}{
		{"nbdcopy", []string{"nbdcopy", src, uri(s, "vol00000001")}},
		{"qemu-io", []string{"qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", uri(s, "vol00000001")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := run(t, tt.args[0], tt.args[1:]...)
			// qemu-io reports a failed command on stdout with status 0.
			if err == nil && !strings.Contains(strings.ToLower(out), "read-only") &&
				!strings.Contains(out, "not permitted") {
				t.Fatalf("write to read-only export succeeded: %s", out)
			}
			fileEquals(t, backing, orig)
		})
	}
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	if c.flags&tfReadOnly == 0 {
		t.Errorf("transmission flags %#x lack NBD_FLAG_READ_ONLY", c.flags)
	}
	for _, typ := range []uint16{cmdWrite, cmdTrim} {
		var data []byte
		if typ == cmdWrite {
			data = make([]byte, 4096)
		}
		errno, _, err := c.cmd(typ, 0, 0, 4096, data)
		if err != nil || errno != errPerm {
			t.Errorf("command %d on read-only export: errno %d, err %v; want EPERM", typ, errno, err)
		}
	}
	fileEquals(t, backing, orig)
}

// TestWireCommands: exact replies for commands the CLI clients do not
// expose, on a read-write file export.
func TestWireCommands(t *testing.T) {
	s := startServer(t)
	backing := backingFile(t, "vol.img", pattern(mib, 3))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backing})
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	if c.size != mib || c.flags&tfSendTrim == 0 || c.flags&tfSendFlush == 0 || c.flags&tfReadOnly != 0 {
		t.Fatalf("size %d flags %#x", c.size, c.flags)
	}
	tests := []struct {
		name  string
		typ   uint16
		flags uint16
		off   uint64
		n     uint32
		data  []byte
		want  uint32
	}{
		{"read in range", cmdRead, 0, mib - 4096, 4096, nil, 0},
		{"read past end", cmdRead, 0, mib - 4096, 8192, nil, errInval},
		{"read offset overflow", cmdRead, 0, ^uint64(0) - 10, 4096, nil, errInval},
		{"write FUA", cmdWrite, cmdFlagFUA, 4096, 4096, pattern(4096, 42), 0},
		{"write past end", cmdWrite, 0, mib, 512, make([]byte, 512), errNoSpace},
		{"flush", cmdFlush, 0, 0, 0, nil, 0},
		{"trim", cmdTrim, 0, 64 << 10, 64 << 10, nil, 0},
		{"trim past end", cmdTrim, 0, mib - 512, 4096, nil, errNoSpace},
		{"unknown command", 99, 0, 0, 0, nil, errInval},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errno, _, err := c.cmd(tt.typ, tt.flags, tt.off, tt.n, tt.data)
			if err != nil || errno != tt.want {
				t.Fatalf("errno %d, err %v; want %d", errno, err, tt.want)
			}
		})
	}
	// Counted by the time the replies are in: the one read and write done.
	if st := s.Stats(); st.BytesRead != 4096 || st.BytesWritten != 4096 {
		t.Fatalf("stats %+v after the replies, want 4096 bytes read and 4096 written", st)
	}
	got, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}
	want := pattern(mib, 3)
	copy(want[4096:], pattern(4096, 42))
	clear(want[64<<10 : 128<<10]) // trimmed: a punched hole reads as zeroes
	if firstDiff(got, want) != len(want) {
		t.Fatalf("backing differs at %d", firstDiff(got, want))
	}
}

// TestConcurrentClients: two clients writing different exports at once
// each land on their own backing file.
func TestConcurrentClients(t *testing.T) {
	requireTools(t, "nbdcopy")
	s := startServer(t)
	names := []string{"vol00000001", "vol00000002", "vol00000003"}
	var specs []ExportSpec
	var datas [][]byte
	var srcs []string
	for i, n := range names {
		specs = append(specs, ExportSpec{Name: n, Path: backingFile(t, n+".img", make([]byte, 16*mib))})
		datas = append(datas, pattern(16*mib, byte(10+i)))
		srcs = append(srcs, backingFile(t, n+".src", datas[i]))
	}
	setExports(t, s, specs...)
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	outs := make([]string, len(names))
	for i, n := range names {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
			defer cancel()
			out, err := exec.CommandContext(ctx, "nbdcopy", srcs[i], uri(s, n)).CombinedOutput()
			errs[i], outs[i] = err, string(out)
		})
	}
	wg.Wait()
	for i := range names {
		if errs[i] != nil {
			t.Fatalf("nbdcopy to %s: %v\n%s", names[i], errs[i], outs[i])
		}
		fileEquals(t, specs[i].Path, datas[i])
	}
}

// TestRemoveWhileConnected: removing an export while qemu-io and a wire
// client are connected closes both connections before SetExports returns,
// refuses new clients, keeps the other export serving, and releases the
// backing file descriptor.
func TestRemoveWhileConnected(t *testing.T) {
	requireTools(t, "qemu-io", "nbdinfo")
	s := startServer(t)
	gone := backingFile(t, "gone.img", pattern(mib, 1))
	kept := backingFile(t, "kept.img", pattern(mib, 2))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: gone}, ExportSpec{Name: "vol00000002", Path: kept})

	// qemu-io reads commands from stdin and stays connected between them.
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	q := exec.CommandContext(ctx, "qemu-io", "-f", "raw", uri(s, "vol00000001"))
	stdin, err := q.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := q.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	q.Stderr = q.Stdout
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	expectLine := func(want string) {
		t.Helper()
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("qemu-io ended before printing %q", want)
				}
				if strings.Contains(l, want) {
					return
				}
			case <-ctx.Done():
				t.Fatalf("qemu-io printed no %q", want)
			}
		}
	}
	if _, err := stdin.Write([]byte("read -P 0x00 0 512\n")); err != nil {
		t.Fatal(err)
	}
	expectLine("read 512/512 bytes")
	w, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, func() bool { return s.Exports()[0].Clients == 2 }, "two clients on vol00000001: %+v", s.Exports())
	if !fdOpen(t, gone) {
		t.Fatal("backing fd not open while served")
	}

	setExports(t, s, ExportSpec{Name: "vol00000002", Path: kept})

	if fdOpen(t, gone) {
		t.Error("backing fd still open after SetExports returned")
	}
	if _, _, err := w.cmd(cmdRead, 0, 0, 512, nil); err == nil {
		t.Error("wire client read after removal succeeded")
	}
	if _, err := stdin.Write([]byte("read 0 512\n")); err != nil {
		t.Fatal(err)
	}
	expectLine("read failed")
	stdin.Close()
	if err := q.Wait(); err != nil && ctx.Err() != nil {
		t.Fatalf("qemu-io: %v", err)
	}
	if out, err := run(t, "nbdinfo", uri(s, "vol00000001")); err == nil || !strings.Contains(out, "No such file or directory for export") {
		t.Errorf("new client on removed export: err %v, %s", err, out)
	}
	if got := nbdinfo(t, uri(s, "vol00000002")); len(got) != 1 || got[0].Size != mib {
		t.Errorf("kept export: %+v", got)
	}
}

// TestChangedSpec: a changed ReadOnly is a remove and an add (clients are
// closed, new ones see the new mode); a changed Description alone keeps
// connected clients.
func TestChangedSpec(t *testing.T) {
	s := startServer(t)
	p := backingFile(t, "vol.img", make([]byte, mib))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: p, ReadOnly: true})
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: p, ReadOnly: true, Description: "new"})
	if errno, _, err := c.cmd(cmdRead, 0, 0, 512, nil); err != nil || errno != 0 {
		t.Fatalf("read after description change: %d %v", errno, err)
	}
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: p})
	if _, _, err := c.cmd(cmdRead, 0, 0, 512, nil); err == nil {
		t.Fatal("client of the read-only export survived the switch to read-write")
	}
	c2, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	if errno, _, err := c2.cmd(cmdWrite, 0, 0, 512, pattern(512, 5)); err != nil || errno != 0 {
		t.Fatalf("write after switch to read-write: %d %v", errno, err)
	}
}

// TestSetExportsErrors: invalid specs change nothing; an export that
// cannot be opened is left out while the rest is applied.
func TestSetExportsErrors(t *testing.T) {
	s := startServer(t)
	p := backingFile(t, "vol.img", make([]byte, mib))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: p})
	invalid := []struct {
		name  string
		specs []ExportSpec
	}{
		{"uppercase", []ExportSpec{{Name: "vol0000000A", Path: p}}},
		{"short", []ExportSpec{{Name: "vol0001", Path: p}}},
		{"traversal", []ExportSpec{{Name: "../etc", Path: p}}},
		{"empty name", []ExportSpec{{Name: "", Path: p}}},
		{"relative path", []ExportSpec{{Name: "vol00000002", Path: "vol.img"}}},
		{"duplicate", []ExportSpec{{Name: "vol00000002", Path: p}, {Name: "vol00000002", Path: p}}},
	}
	for _, tt := range invalid {
		t.Run(tt.name, func(t *testing.T) {
			err := s.SetExports(context.Background(), tt.specs)
			if !errors.Is(err, ErrInvalidSpec) {
				t.Fatalf("err %v, want ErrInvalidSpec", err)
			}
			if got := s.Exports(); len(got) != 1 || got[0].Name != "vol00000001" {
				t.Fatalf("set changed: %+v", got)
			}
		})
	}
	unopenable := []struct {
		name     string
		path     string
		readOnly bool
		is       error
	}{
		{"missing", filepath.Join(t.TempDir(), "missing.img"), false, os.ErrNotExist},
		{"directory", t.TempDir(), true, ErrNotBlockOrFile},
		{"character device", "/dev/null", false, ErrNotBlockOrFile},
	}
	for _, tt := range unopenable {
		t.Run(tt.name, func(t *testing.T) {
			err := s.SetExports(context.Background(), []ExportSpec{{Name: "vol00000002", Path: tt.path, ReadOnly: tt.readOnly}, {Name: "vol00000003", Path: p}})
			var ee *ExportError
			if !errors.As(err, &ee) || ee.Name != "vol00000002" || !errors.Is(err, tt.is) {
				t.Fatalf("err %v, want *ExportError for vol00000002 wrapping %v", err, tt.is)
			}
			if got := s.Exports(); len(got) != 1 || got[0].Name != "vol00000003" {
				t.Fatalf("served %+v, want only vol00000003", got)
			}
		})
	}
}

// TestClose: Close ends connections, releases fds, refuses later calls,
// and is safe twice.
func TestClose(t *testing.T) {
	s := startServer(t)
	p := backingFile(t, "vol.img", make([]byte, mib))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: p})
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := s.Close(context.Background()); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	if _, _, err := c.cmd(cmdRead, 0, 0, 512, nil); err == nil {
		t.Error("connection survived Close")
	}
	if fdOpen(t, p) {
		t.Error("backing fd open after Close")
	}
	if err := s.SetExports(context.Background(), nil); !errors.Is(err, ErrClosed) {
		t.Errorf("SetExports after Close: %v", err)
	}
	if err := s.Start(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: %v", err)
	}
}

// TestRemove: Remove ends one export and its clients, leaves the others,
// and is a no-op for a name not served.
func TestRemove(t *testing.T) {
	s := startServer(t)
	a := backingFile(t, "a.img", make([]byte, mib))
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: a}, ExportSpec{Name: "vol00000002", Path: backingFile(t, "b.img", make([]byte, mib))})
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"vol00000001", "vol00000001", "vol0000000f"} {
		if err := s.Remove(context.Background(), name); err != nil {
			t.Fatalf("Remove(%s): %v", name, err)
		}
	}
	if got := s.Exports(); len(got) != 1 || got[0].Name != "vol00000002" {
		t.Fatalf("Exports() %+v, want only vol00000002", got)
	}
	if _, _, err := c.cmd(cmdRead, 0, 0, 512, nil); err == nil {
		t.Error("client of the removed export still served")
	}
	if fdOpen(t, a) {
		t.Error("backing fd open after Remove")
	}
}
