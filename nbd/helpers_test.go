package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
)

// clientTimeout bounds every run of an external NBD client.
const clientTimeout = 30 * time.Second

// requireTools skips (or fails under CI=true) without the named programs.
func requireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		_, err := exec.LookPath(n)
		testenv.Require(t, err == nil, "needs %s (Debian libnbd-bin / qemu-utils)", n)
	}
}

// startServer starts a Server on a free loopback port, closed at cleanup.
func startServer(t testing.TB) *Server {
	t.Helper()
	return startServerWith(t, Config{})
}

// startServerWith starts a Server with cfg on a free loopback port, closed
// at cleanup.
func startServerWith(t testing.TB, cfg Config) *Server {
	t.Helper()
	cfg.Listen = "127.0.0.1:0"
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// setExports calls SetExports with a timeout and fails the test on error.
func setExports(t testing.TB, s *Server, specs ...ExportSpec) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.SetExports(ctx, specs); err != nil {
		t.Fatalf("SetExports: %v", err)
	}
}

// uri is the nbd:// URI of an export on s.
func uri(s *Server, name string) string { return "nbd://" + s.Addr().String() + "/" + name }

// pattern is n bytes that differ per 512-byte sector and per seed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i/512) ^ seed ^ byte(i)
	}
	return b
}

// backingFile writes data to a new file in dir and returns its path.
func backingFile(t testing.TB, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// run runs an external client with clientTimeout and returns its combined
// output.
func run(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %v hung: %v\n%s", name, args, ctx.Err(), out)
	}
	return string(out), err
}

// mustRun is run that fails the test when the client fails.
func mustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := run(t, name, args...)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return out
}

// nbdshEnv is the environment nbdsh runs in: Debian's nbdsh needs
// Debian's python3 (with the nbd module), so /usr/bin comes first.
func nbdshEnv() []string { return append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH")) }

// requireNbdsh skips (or fails under CI=true) unless nbdsh runs with its
// Python module (Debian python3-libnbd).
func requireNbdsh(t testing.TB) {
	t.Helper()
	requireTools(t, "nbdsh")
	cmd := exec.Command("nbdsh", "-n", "-c", "import nbd")
	cmd.Env = nbdshEnv()
	out, err := cmd.CombinedOutput()
	testenv.Require(t, err == nil, "needs a working nbdsh (Debian python3-libnbd): %v %s", err, out)
}

// nbdsh runs a Python script in nbdsh connected to uri with base:allocation
// requested (h is the handle); the script asserts, and a failed
// assertion fails the test with its output.
func nbdsh(t testing.TB, uri, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nbdsh", "--base-allocation", "-u", uri, "-c", script)
	cmd.Env = nbdshEnv()
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("nbdsh hung: %v\n%s", ctx.Err(), out)
	}
	if err != nil {
		t.Fatalf("nbdsh: %v\n%s", err, out)
	}
	return string(out)
}

// mapEntry is one extent of `nbdinfo --map --json`.
type mapEntry struct {
	Offset uint64 `json:"offset"`
	Length uint64 `json:"length"`
	Type   uint32 `json:"type"`
}

// nbdinfoMap runs `nbdinfo --map --json uri`.
func nbdinfoMap(t testing.TB, uri string) []mapEntry {
	t.Helper()
	out := mustRun(t, "nbdinfo", "--map", "--json", uri)
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map output: %v\n%s", err, out)
	}
	return m
}

// span is a byte range [Off, Off+Len).
type span struct{ Off, Len uint64 }

// sparseFile creates a sparse file of size bytes holding pattern data in
// the given ranges and holes elsewhere.
func sparseFile(t testing.TB, size uint64, data []span) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sparse.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	for i, d := range data {
		if _, err := f.WriteAt(pattern(int(d.Len), byte(i+1)), int64(d.Off)); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// wantMap is the base:allocation map of a device of size bytes with data
// in the given sorted, disjoint ranges: data 0, hole|zero 3 elsewhere.
func wantMap(size uint64, data []span) []mapEntry {
	var out []mapEntry
	pos := uint64(0)
	for _, d := range data {
		if d.Off > pos {
			out = append(out, mapEntry{Offset: pos, Length: d.Off - pos, Type: 3})
		}
		out = append(out, mapEntry{Offset: d.Off, Length: d.Len, Type: 0})
		pos = d.Off + d.Len
	}
	if pos < size {
		out = append(out, mapEntry{Offset: pos, Length: size - pos, Type: 3})
	}
	return out
}

// nbdinfoExport is the part of `nbdinfo --json` the tests look at.
type nbdinfoExport struct {
	Name        string   `json:"export-name"`
	Description string   `json:"description"`
	Size        uint64   `json:"export-size"`
	ReadOnly    bool     `json:"is_read_only"`
	CanTrim     bool     `json:"can_trim"`
	CanFlush    bool     `json:"can_flush"`
	CanZero     bool     `json:"can_zero"`
	CanFastZero bool     `json:"can_fast_zero"`
	CanCache    bool     `json:"can_cache"`
	CanMulti    bool     `json:"can_multi_conn"`
	Contexts    []string `json:"contexts"`
}

// nbdinfoTop is `nbdinfo --json` with the connection-level fields.
type nbdinfoTop struct {
	TLS        bool            `json:"TLS"`
	Structured bool            `json:"structured"`
	Exports    []nbdinfoExport `json:"exports"`
}

// nbdinfo runs `nbdinfo --json [args] uri` and decodes the exports.
func nbdinfo(t testing.TB, args ...string) []nbdinfoExport {
	t.Helper()
	out := mustRun(t, "nbdinfo", append([]string{"--json"}, args...)...)
	var v struct {
		Exports []nbdinfoExport `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	return v.Exports
}

// fileEquals fails unless the file at path holds want.
func fileEquals(t testing.TB, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: content differs from the expected %d bytes (got %d bytes, first difference at %d)",
			path, len(want), len(got), firstDiff(got, want))
	}
}

// firstDiff is the first index where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// fdOpen reports whether this process holds a file descriptor on path.
func fdOpen(t testing.TB, path string) bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && l == path {
			return true
		}
	}
	return false
}

// wireClient is a minimal NBD client speaking the protocol directly, for
// assertions on exact reply codes that the command-line clients hide, and
// for the benchmark.
type wireClient struct {
	nc    net.Conn
	br    *bufio.Reader
	size  uint64
	flags uint16
	seq   uint64
}

// optError is an option error reply from the server.
type optError struct{ typ uint32 }

func (e *optError) Error() string { return fmt.Sprintf("option reply %#x", e.typ) }

// dialWire connects to the export with NBD_OPT_GO.
// The connection is closed when negotiation fails, or at cleanup.
func dialWire(t testing.TB, addr net.Addr, name string) (_ *wireClient, err error) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		return nil, err
	}
	c := &wireClient{nc: nc, br: bufio.NewReader(nc)}
	t.Cleanup(func() { nc.Close() })
	defer func() {
		if err != nil {
			nc.Close()
		}
	}()
	var hello [18]byte
	if _, err := io.ReadFull(c.br, hello[:]); err != nil {
		return nil, err
	}
	if binary.BigEndian.Uint64(hello[:]) != magicNBD || binary.BigEndian.Uint64(hello[8:]) != magicOpt {
		return nil, errors.New("bad server greeting")
	}
	data := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	data = binary.BigEndian.AppendUint16(append(data, name...), 0)
	msg := binary.BigEndian.AppendUint32(nil, clientFixed|clientNoZeroes)
	msg = binary.BigEndian.AppendUint64(msg, magicOpt)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	if _, err := nc.Write(append(msg, data...)); err != nil {
		return nil, err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return nil, err
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		body := make([]byte, n)
		if _, err := io.ReadFull(c.br, body); err != nil {
			return nil, err
		}
		switch {
		case typ == repAck:
			return c, nil
		case typ&(1<<31) != 0:
			return nil, &optError{typ: typ}
		case typ == repInfo && binary.BigEndian.Uint16(body) == infoExport:
			c.size, c.flags = binary.BigEndian.Uint64(body[2:]), binary.BigEndian.Uint16(body[10:])
		}
	}
}

// cmd sends one command and waits for its reply: the NBD error and, for a
// successful read, the data.
func (c *wireClient) cmd(typ, flags uint16, off uint64, n uint32, data []byte) (uint32, []byte, error) {
	c.seq++
	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], magicRequest)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], c.seq)
	binary.BigEndian.PutUint64(h[16:], off)
	binary.BigEndian.PutUint32(h[24:], n)
	bufs := net.Buffers{h[:], data}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		return 0, nil, err
	}
	var r [16]byte
	if _, err := io.ReadFull(c.br, r[:]); err != nil {
		return 0, nil, err
	}
	if got := binary.BigEndian.Uint64(r[8:]); got != c.seq {
		return 0, nil, fmt.Errorf("reply cookie %d, want %d", got, c.seq)
	}
	errno := binary.BigEndian.Uint32(r[4:])
	if typ != cmdRead || errno != 0 {
		return errno, nil, nil
	}
	out := make([]byte, n)
	_, err := io.ReadFull(c.br, out)
	return 0, out, err
}
