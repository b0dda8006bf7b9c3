package devagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
)

const wait = 10 * time.Second

// fakeSource is an EventSource whose uevents and errors the test injects:
// it stands for a kernel socket that overflowed (ENOBUFS) or skipped a
// SEQNUM, which cannot be produced on demand.
type fakeSource struct {
	items  chan fakeItem
	closed chan struct{}
	once   sync.Once
}

type fakeItem struct {
	u   Uevent
	err error
}

var _ EventSource = (*fakeSource)(nil)

func newFakeSource() *fakeSource {
	return &fakeSource{items: make(chan fakeItem), closed: make(chan struct{})}
}

func (f *fakeSource) Receive() (Uevent, error) {
	select {
	case it := <-f.items:
		return it.u, it.err
	case <-f.closed:
		return Uevent{}, ErrSourceClosed
	}
}

func (f *fakeSource) Close() error {
	f.once.Do(func() { close(f.closed) })
	return nil
}

func (f *fakeSource) send(t *testing.T, u Uevent, err error) {
	t.Helper()
	select {
	case f.items <- fakeItem{u, err}:
	case <-time.After(wait):
		t.Fatal("agent did not receive from the fake source")
	}
}

// tapSource passes a real source's uevents through, remembering how many
// it had delivered when each disk uevent arrived.
type tapSource struct {
	EventSource
	mu   sync.Mutex
	n    int64
	seen map[string]int64 // "action name" → uevents delivered up to it
}

var _ EventSource = (*tapSource)(nil)

func (s *tapSource) Receive() (Uevent, error) {
	u, err := s.EventSource.Receive()
	if err == nil {
		s.mu.Lock()
		s.n++
		if s.seen == nil {
			s.seen = map[string]int64{}
		}
		if u.IsDisk() {
			s.seen[u.Action+" "+u.Name()] = s.n
		}
		s.mu.Unlock()
	}
	return u, err
}

// received reports whether the uevent action on disk name was delivered,
// and how many uevents had been delivered up to it.
func (s *tapSource) received(name, action string) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.seen[action+" "+name]
	return n, ok
}

// recorder records published devices.
type recorder struct {
	mu   sync.Mutex
	evs  []commands.Device
	fail func(commands.Device) bool
}

func (r *recorder) publish(ctx context.Context, d commands.Device) error {
	if _, ok := ctx.Deadline(); !ok {
		return errors.New("publish called without a deadline")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil && r.fail(d) {
		return errors.New("bus down")
	}
	r.evs = append(r.evs, d)
	return nil
}

// of returns the published events about backing file b, in order.
func (r *recorder) of(backing string) []commands.Device {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []commands.Device
	for _, d := range r.evs {
		if d.BackingFile == backing {
			out = append(out, d)
		}
	}
	return out
}

// startAgent starts an agent on the real /sys, closed when the test ends.
func startAgent(t *testing.T, cfg Config) (*Agent, *recorder) {
	t.Helper()
	rec := &recorder{}
	if cfg.Publish == nil {
		cfg.Publish = rec.publish
	}
	cfg.VMID = "vm-test"
	cfg.Logger = testLogger(t)
	if cfg.ScanInterval == 0 {
		cfg.ScanInterval = time.Hour // only the trigger under test scans
	}
	a := New(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if err := a.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return a, rec
}

// testLogger writes the agent's log into the test's output.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

// backingFile makes a sparse file named after a volume UUID. Other test
// binaries make loop devices in parallel: events are matched by this path.
func backingFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vol-"+testUUID+".img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// newLoop makes a loop device on a new backing file of size bytes; it is
// removed when the test ends.
func newLoop(t *testing.T, size int64) (*loopdev.Device, string) {
	t.Helper()
	testenv.RequireLoopControl(t)
	backing := backingFile(t, size)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	d, err := loopdev.Create(ctx, backing)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeLoop(t, d) })
	return d, backing
}

// removed holds the devices a test already removed, so that its cleanup
// does not remove them again: by then another process may have made a new
// device with the same index, and loopdev rightly refuses to touch it.
var removed sync.Map

func removeLoop(t *testing.T, d *loopdev.Device) {
	t.Helper()
	if _, done := removed.LoadOrStore(d, true); done {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := d.Remove(ctx); err != nil {
		t.Errorf("remove %s: %v", d.Path, err)
	}
}

// wantEvent polls until an event about backing with action appears and
// returns it.
func wantEvent(t *testing.T, rec *recorder, backing string, action commands.DeviceAction) commands.Device {
	t.Helper()
	var got commands.Device
	testenv.Eventually(t, wait, func() bool {
		for _, d := range rec.of(backing) {
			if d.Action == action {
				got = d
				return true
			}
		}
		return false
	}, "%s event for %s; have %+v", action, backing, rec.of(backing))
	return got
}

func checkDevice(t *testing.T, d commands.Device, loop *loopdev.Device, backing string, size int64) {
	t.Helper()
	if d.Name != loop.Name() || d.Path != loop.Path || d.Size != size || d.BackingFile != backing ||
		d.Major != 7 || d.Controller != "loop" || d.VMID != "vm-test" || d.Time.IsZero() {
		t.Fatalf("device = %+v; want %s (%s) size %d backing %s", d, loop.Name(), loop.Path, size, backing)
	}
	if !MatchesVolume(d, testUUID) {
		t.Fatalf("device %+v does not match volume %s", d, testUUID)
	}
}

func TestAgentRealLoopAddRemove(t *testing.T) {
	testenv.RequireLoopControl(t)
	a, rec := startAgent(t, Config{})
	events, cancel := a.Subscribe()
	defer cancel()

	loop, backing := newLoop(t, 1<<20)
	add := wantEvent(t, rec, backing, commands.DeviceAdd)
	checkDevice(t, add, loop, backing, 1<<20)
	if d, ok := a.Device(loop.Name()); !ok || d.BackingFile != backing {
		t.Fatalf("Device(%s) = %+v, %v", loop.Name(), d, ok)
	}
	// The in-process subscriber sees the same add.
	for d := range events {
		if d.BackingFile == backing {
			if d.Action != commands.DeviceAdd || d.Size != 1<<20 {
				t.Fatalf("first subscribed event = %+v, want add of size %d", d, 1<<20)
			}
			break
		}
	}
	if st := a.Status(); !st.SocketLive || st.EventsProcessed == 0 || !st.LastScanOK || st.DeviceCount == 0 {
		t.Fatalf("Status() = %+v", st)
	}

	removeLoop(t, loop)
	rm := wantEvent(t, rec, backing, commands.DeviceRemove)
	checkDevice(t, rm, loop, backing, 1<<20)
	if d, ok := a.Device(loop.Name()); ok && d.BackingFile == backing {
		t.Fatalf("Device(%s) still known after remove: %+v", loop.Name(), d)
	}
	if n := len(rec.of(backing)); n != 2 {
		t.Fatalf("published %d events for the device, want add and remove: %+v", n, rec.of(backing))
	}
}

// TestAgentAddThenChangeSize follows a loop device that appears empty
// (add, size 0), gets a backing file (change) and then grows (change).
func TestAgentAddThenChangeSize(t *testing.T) {
	testenv.RequireLoopControl(t)
	src, err := NewKobjectSource()
	if err != nil {
		t.Fatal(err)
	}
	tap := &tapSource{EventSource: src}
	a, rec := startAgent(t, Config{Source: tap})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()

	loop, err := loopdev.Add(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeLoop(t, loop) })
	// Let the agent handle the empty device's add uevent.
	testenv.Eventually(t, wait, func() bool {
		n, ok := tap.received(loop.Name(), "add")
		return ok && a.Status().EventsProcessed >= n
	}, "add uevent of %s handled", loop.Name())
	if d, ok := a.Device(loop.Name()); ok {
		t.Fatalf("empty loop device counted as a disk: %+v", d)
	}

	backing := backingFile(t, 1<<20)
	if err := loop.Bind(ctx, backing); err != nil {
		t.Fatal(err)
	}
	add := wantEvent(t, rec, backing, commands.DeviceAdd)
	checkDevice(t, add, loop, backing, 1<<20)

	if err := os.Truncate(backing, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := loop.Resize(); err != nil {
		t.Fatal(err)
	}
	change := wantEvent(t, rec, backing, commands.DeviceChange)
	checkDevice(t, change, loop, backing, 4<<20)
	if d, _ := a.Device(loop.Name()); d.Size != 4<<20 {
		t.Fatalf("Device(%s).Size = %d after change, want %d", loop.Name(), d.Size, 4<<20)
	}
	for _, d := range rec.of(backing) {
		if d.Size == 0 {
			t.Fatalf("published a device of size 0: %+v", d)
		}
	}
}

func TestAgentFindsDeviceCreatedBeforeStart(t *testing.T) {
	loop, backing := newLoop(t, 2<<20)
	a, rec := startAgent(t, Config{Source: newFakeSource()})
	// Start's own scan found it: no polling needed.
	d, ok := a.Device(loop.Name())
	if !ok {
		t.Fatalf("Device(%s) not found by the start scan", loop.Name())
	}
	checkDevice(t, d, loop, backing, 2<<20)
	evs := rec.of(backing)
	if len(evs) != 1 || evs[0].Action != commands.DeviceAdd || evs[0].Seqnum != 0 {
		t.Fatalf("published %+v; want one add with seqnum 0", evs)
	}
}

// TestAgentRescans checks each trigger of a full scan while the event
// source delivers nothing about the device: a receive error, a SEQNUM gap,
// the scan interval. Before the trigger, contiguous uevents must not make
// the agent find it.
func TestAgentRescans(t *testing.T) {
	tests := []struct {
		name     string
		interval time.Duration
		trigger  func(t *testing.T, src *fakeSource)
	}{
		{"receive error", 0, func(t *testing.T, src *fakeSource) {
			src.send(t, Uevent{}, fmt.Errorf("receive: %w", errors.New("no buffer space available")))
		}},
		{"seqnum gap", 0, func(t *testing.T, src *fakeSource) {
			src.send(t, Uevent{Subsystem: "net", Seqnum: 110}, nil)
		}},
		{"scan interval", 50 * time.Millisecond, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			testenv.RequireLoopControl(t)
			src := newFakeSource()
			a, rec := startAgent(t, Config{Source: src, ScanInterval: tt.interval})
			loop, backing := newLoop(t, 1<<20)
			if tt.trigger != nil {
				for seq := uint64(100); seq < 103; seq++ {
					src.send(t, Uevent{Subsystem: "net", Seqnum: seq}, nil)
				}
				testenv.Eventually(t, wait, func() bool { return a.Status().EventsProcessed == 3 }, "3 uevents handled")
				if _, ok := a.Device(loop.Name()); ok {
					t.Fatal("device found without a trigger")
				}
				tt.trigger(t, src)
			}
			add := wantEvent(t, rec, backing, commands.DeviceAdd)
			checkDevice(t, add, loop, backing, 1<<20)
			if add.Seqnum != 0 {
				t.Fatalf("scan-found device has seqnum %d, want 0", add.Seqnum)
			}
			if tt.interval != 0 {
				removeLoop(t, loop)
				wantEvent(t, rec, backing, commands.DeviceRemove)
			}
		})
	}
}

func TestAgentSocketLive(t *testing.T) {
	src := newFakeSource()
	a, _ := startAgent(t, Config{Source: src, SysRoot: sysTree})
	if !a.Status().SocketLive {
		t.Fatal("SocketLive false on a fresh source")
	}
	src.send(t, Uevent{}, errors.New("no buffer space available"))
	testenv.Eventually(t, wait, func() bool { return !a.Status().SocketLive }, "SocketLive false after a receive error")
	src.send(t, Uevent{Subsystem: "net", Seqnum: 1}, nil)
	testenv.Eventually(t, wait, func() bool { return a.Status().SocketLive }, "SocketLive true after a good receive")
}

func TestAgentRetriesFailedPublish(t *testing.T) {
	loop, backing := newLoop(t, 1<<20)
	rec := &recorder{}
	var failed sync.Once
	rec.fail = func(d commands.Device) bool {
		fail := false
		if d.BackingFile == backing {
			failed.Do(func() { fail = true })
		}
		return fail
	}
	a, _ := startAgent(t, Config{Source: newFakeSource(), Publish: rec.publish, ScanInterval: 50 * time.Millisecond})
	add := wantEvent(t, rec, backing, commands.DeviceAdd)
	checkDevice(t, add, loop, backing, 1<<20)
	testenv.Eventually(t, wait, func() bool { return a.Status().PublishPending == 0 }, "no publish pending")
}

func TestFold(t *testing.T) {
	dev := func(a commands.DeviceAction, size int64) commands.Device {
		return commands.Device{Name: "vdb", Action: a, Size: size}
	}
	tests := []struct {
		name              string
		unpublished, next commands.Device
		want              commands.Device
		ok                bool
	}{
		{"unseen add then change is an add", dev(commands.DeviceAdd, 1), dev(commands.DeviceChange, 2), dev(commands.DeviceAdd, 2), true},
		{"unseen add then remove is nothing", dev(commands.DeviceAdd, 1), dev(commands.DeviceRemove, 1), commands.Device{}, false},
		{"unseen change then change", dev(commands.DeviceChange, 1), dev(commands.DeviceChange, 2), dev(commands.DeviceChange, 2), true},
		{"unseen remove then add", dev(commands.DeviceRemove, 1), dev(commands.DeviceAdd, 3), dev(commands.DeviceAdd, 3), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := fold(tt.unpublished, tt.next)
			if got != tt.want || ok != tt.ok {
				t.Fatalf("fold = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

// TestAgentFakeTree drives the agent with uevents over a copy of the fake
// sysfs tree: partitions, ignored and empty devices publish nothing; an
// empty loop device filled later is an add, a resize a change.
func TestAgentFakeTree(t *testing.T) {
	root := copyTree(t)
	src := newFakeSource()
	a, rec := startAgent(t, Config{Source: src, SysRoot: root})
	names := func() []string {
		var out []string
		for _, d := range a.Devices() {
			out = append(out, d.Name)
		}
		return out
	}
	if got := fmt.Sprint(names()); got != "[dm-1 loop3 sda vda]" {
		t.Fatalf("Devices() = %s", got)
	}
	rec.mu.Lock()
	initial := len(rec.evs)
	rec.mu.Unlock()

	seq := uint64(500)
	handle := func(u Uevent) {
		t.Helper()
		seq++
		u.Seqnum = seq
		n := a.Status().EventsProcessed
		src.send(t, u, nil)
		testenv.Eventually(t, wait, func() bool { return a.Status().EventsProcessed > n }, "uevent %d handled", seq)
	}
	published := func() []commands.Device {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return append([]commands.Device(nil), rec.evs[initial:]...)
	}
	write := func(rel, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(root, rel), []byte(content+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	handle(Uevent{Action: "add", Subsystem: "block", DevType: "partition", DevName: "vda1"})
	handle(Uevent{Action: "change", Subsystem: "block", DevType: "disk", DevName: "dm-0"})
	handle(Uevent{Action: "add", Subsystem: "block", DevType: "disk", DevName: "loop4"})
	if got := published(); len(got) != 0 {
		t.Fatalf("published %+v for a partition, an ignored and an empty device", got)
	}

	loop4 := "devices/virtual/block/loop4/"
	if err := os.MkdirAll(filepath.Join(root, loop4, "loop"), 0o755); err != nil {
		t.Fatal(err)
	}
	write(loop4+"loop/backing_file", "/var/lib/volumed/vol-"+testUUID+".img")
	write(loop4+"size", "2048")
	handle(Uevent{Action: "change", Subsystem: "block", DevType: "disk", DevName: "loop4"})
	write(loop4+"size", "4096")
	handle(Uevent{Action: "change", Subsystem: "block", DevType: "disk", DevName: "loop4"})
	write(loop4+"size", "0")
	handle(Uevent{Action: "change", Subsystem: "block", DevType: "disk", DevName: "loop4"})

	got := published()
	want := []struct {
		action commands.DeviceAction
		size   int64
	}{{commands.DeviceAdd, 2048 * 512}, {commands.DeviceChange, 4096 * 512}, {commands.DeviceRemove, 4096 * 512}}
	if len(got) != len(want) {
		t.Fatalf("published %+v; want %v", got, want)
	}
	for i, w := range want {
		g := got[i]
		if g.Name != "loop4" || g.Action != w.action || g.Size != w.size || !MatchesVolume(g, testUUID) || g.Seqnum != 500+4+uint64(i) {
			t.Errorf("event %d = %+v; want %s of size %d", i, g, w.action, w.size)
		}
	}
}

func TestAgentLifecycle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	a := New(Config{Source: newFakeSource(), SysRoot: sysTree, Logger: testLogger(t)})
	if st := a.Status(); st.ScanInterval != DefaultScanInterval {
		t.Fatalf("default ScanInterval = %v", st.ScanInterval)
	}
	events, stop := a.Subscribe()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); !errors.Is(err, ErrStarted) {
		t.Fatalf("second Start = %v, want ErrStarted", err)
	}
	// The start scan's adds reach the subscriber, sorted by name.
	first := <-events
	if first.Action != commands.DeviceAdd || first.Name != "dm-1" {
		t.Fatalf("first subscribed event = %+v", first)
	}
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(ctx); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	for range events { // Close closes it
	}
	stop() // after Close: safe
	if _, ok := <-func() <-chan commands.Device { ch, _ := a.Subscribe(); return ch }(); ok {
		t.Fatal("Subscribe after Close returned an open channel")
	}
	if err := a.Start(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close = %v, want ErrClosed", err)
	}

	bad := New(Config{Source: newFakeSource(), SysRoot: t.TempDir(), Logger: testLogger(t)})
	if err := bad.Start(ctx); err == nil {
		t.Fatal("Start without /sys/block succeeded")
	}
	if err := bad.Close(ctx); err != nil {
		t.Fatalf("Close after a failed Start = %v", err)
	}
}

func BenchmarkAgentScan(b *testing.B) {
	a := New(Config{Source: newFakeSource(), ScanInterval: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	ctx := context.Background()
	for b.Loop() {
		if err := a.scan(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(a.Devices())), "disks")
}

func TestAgentIgnore(t *testing.T) {
	tests := []struct {
		name   string
		ignore func(string) bool
		want   string
	}{
		{"persistent names hidden by default", nil, "[dm-1 loop3 sda vda]"},
		{"extra names hidden too", func(n string) bool { return n == "sda" || n == "data" }, "[loop3 vda]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, _ := startAgent(t, Config{Source: newFakeSource(), SysRoot: sysTree, Ignore: tt.ignore})
			var names []string
			for _, d := range a.Devices() {
				names = append(names, d.Name)
			}
			if got := fmt.Sprint(names); got != tt.want {
				t.Fatalf("Devices() = %s, want %s", got, tt.want)
			}
		})
	}
}
