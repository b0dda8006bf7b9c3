package devagent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/testloop"
)

// serveEnv is a real bus, agent and server on a VM id of its own, with a
// loop device whose backing file carries a volume UUID.
type serveEnv struct {
	vm, volume, names string
	nc                *nats.Conn
	js                jetstream.JetStream
	agent             *devagent.Agent
	dev               *loopdev.Device
	// log holds what the agent and the server logged.
	log *testenv.Buffer
}

// state describes, when a wait on the loop device fails, what the agent
// knows of it and what the agent and the server logged about it.
func (e *serveEnv) state() fmt.Stringer { return agentState{e} }

type agentState struct{ e *serveEnv }

func (s agentState) String() string {
	name := s.e.dev.Name()
	d, known := s.e.agent.Device(name)
	about := regexp.MustCompile(`\b` + name + `\b`)
	var lines []string
	for _, l := range s.e.log.Lines() {
		if about.MatchString(l) {
			lines = append(lines, l)
		}
	}
	return fmt.Sprintf("the agent knows %s: %v %+v; status %+v; the log about it:\n%s",
		name, known, d, s.e.agent.Status(), strings.Join(lines, "\n"))
}

// names keeps the persistent names; nil means a Namer on e.names.
func startServe(t *testing.T, before func(namesDir string), names devagent.Names) *serveEnv {
	t.Helper()
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b := testenv.StartBus(t)
	e := &serveEnv{vm: uuid.NewString(), volume: uuid.NewString(), names: filepath.Join(t.TempDir(), "by-volume"),
		nc: b.Conn(), js: b.JetStream(), log: &testenv.Buffer{}}
	logger := slog.New(slog.NewTextHandler(e.log, nil))
	if before != nil {
		before(e.names)
	}
	if names == nil {
		names = devagent.NewNamer(e.names)
	}
	agent := devagent.New(devagent.Config{VMID: e.vm, Logger: logger})
	if err := agent.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Close(context.Background()) })
	e.agent = agent
	srv := devagent.NewServer(devagent.ServerConfig{VMID: e.vm, Conn: b.Conn(), JetStream: b.JetStream(),
		Agent: agent, Namer: names, Logger: logger})
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = srv.Close(context.Background())
		_ = srv.Close(context.Background()) // twice is safe
	})
	e.dev = testloop.Volume(ctx, t, t.TempDir(), e.volume)
	return e
}

// request sends body to a subject of the VM and returns the reply data.
func (e *serveEnv) request(t *testing.T, subject string, body []byte) []byte {
	t.Helper()
	msg, err := e.nc.Request(subject, body, 5*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return msg.Data
}

// event waits for the stored event of the loop device on subject.
func (e *serveEnv) event(t *testing.T, action commands.DeviceAction) commands.Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cons, err := e.js.OrderedConsumer(ctx, bus.StreamDevices, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{commands.DeviceSubject(e.vm, action)}})
	if err != nil {
		t.Fatal(err)
	}
	for {
		msg, err := cons.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatalf("no stored %s event of %s: %v", action, e.dev.Path, err)
		}
		var d commands.Device
		if err := json.Unmarshal(msg.Data(), &d); err != nil {
			t.Fatalf("event %s: %v", msg.Data(), err)
		}
		if d.Name == e.dev.Name() && devagent.MatchesVolume(d, e.volume) {
			return d
		}
	}
}

func TestServerPublishesAndLists(t *testing.T) {
	e := startServe(t, nil, nil)
	add := e.event(t, commands.DeviceAdd)
	if add.Action != commands.DeviceAdd || add.VMID != e.vm || add.Size != 3<<20 || add.Time.IsZero() {
		t.Errorf("add event = %+v", add)
	}
	var devs []commands.Device
	if err := json.Unmarshal(e.request(t, commands.DevicesListSubject(e.vm), nil), &devs); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, d := range devs {
		found = found || (d.Path == e.dev.Path && devagent.MatchesVolume(d, e.volume) && d.VMID == e.vm)
	}
	if !found {
		t.Errorf("list lacks %s: %+v", e.dev.Path, devs)
	}

	// Requests are not events: the stream keeps only add, remove, change.
	info, err := e.js.Stream(context.Background(), bus.StreamDevices)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range info.CachedInfo().Config.Subjects {
		if s == "devices.>" {
			t.Errorf("stream %s captures requests: %v", bus.StreamDevices, info.CachedInfo().Config.Subjects)
		}
	}

	if err := e.dev.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rm := e.event(t, commands.DeviceRemove); rm.Action != commands.DeviceRemove {
		t.Errorf("remove event = %+v", rm)
	}
}

func TestServerNames(t *testing.T) {
	stale := "volaaaaaaaa"
	e := startServe(t, func(dir string) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/dev/null", filepath.Join(dir, stale)); err != nil {
			t.Fatal(err)
		}
	}, nil)
	if target, err := os.Readlink(filepath.Join(e.names, stale)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("name found at start, of no disk, kept: %q, %v", target, err)
	}
	name, other := devagent.PersistentName(e.volume), devagent.PersistentName(uuid.NewString())
	for _, tc := range []struct {
		name      string
		body      string
		wantErr   bool
		wantNames map[string]string
		skipped   string
	}{
		{name: "not JSON", body: `{"names": [`, wantErr: true},
		{name: "bad name", body: `{"names": {"../etc": "` + e.dev.Path + `"}}`, wantErr: true},
		{name: "target outside /dev", body: `{"names": {"` + name + `": "/etc/passwd"}}`, wantErr: true},
		{name: "target escaping /dev", body: `{"names": {"` + name + `": "/dev/../etc/passwd"}}`, wantErr: true},
		{name: "make", body: `{"names": {"` + name + `": "` + e.dev.Path + `"}}`, wantNames: map[string]string{name: e.dev.Path}},
		{name: "absent disk", body: `{"names": {"` + name + `": "/dev/loop99999"}}`, wantNames: map[string]string{}, skipped: name},
		// As a mapping's recorded identity can, after a reboot restarted
		// the diskseqs, match another volume's disk.
		{name: "another volume's disk", body: `{"names": {"` + other + `": "` + e.dev.Path + `"}}`, wantNames: map[string]string{}, skipped: other},
		{name: "make again", body: `{"names": {"` + name + `": "` + e.dev.Path + `"}}`, wantNames: map[string]string{name: e.dev.Path}},
		{name: "outside the set", body: `{"names": {}}`, wantNames: map[string]string{}},
		{name: "make once more", body: `{"names": {"` + name + `": "` + e.dev.Path + `"}}`, wantNames: map[string]string{name: e.dev.Path}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var reply devagent.NamesMessage
			if err := json.Unmarshal(e.request(t, commands.DevicesNamesSubject(e.vm), []byte(tc.body)), &reply); err != nil {
				t.Fatal(err)
			}
			if tc.wantErr {
				if reply.Error == "" || reply.Names != nil {
					t.Errorf("reply = %+v, want a refusal", reply)
				}
				return
			}
			if reply.Error != "" || reply.Dir != e.names || len(reply.Names) != len(tc.wantNames) {
				t.Fatalf("reply = %+v, want names %v", reply, tc.wantNames)
			}
			for n, target := range tc.wantNames {
				if got, err := os.Readlink(filepath.Join(e.names, n)); err != nil || got != target || reply.Names[n] != target {
					t.Errorf("%s -> %q (%v), reply %q, want %s", n, got, err, reply.Names[n], target)
				}
			}
			if tc.skipped != "" && reply.Skipped[tc.skipped] == "" {
				t.Errorf("%s not reported skipped: %+v", tc.skipped, reply)
			}
		})
	}

	// The device going away takes its name with it.
	if err := e.dev.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := os.Lstat(filepath.Join(e.names, name))
		return errors.Is(err, os.ErrNotExist)
	}, "name of removed device %s removed; %v", e.dev.Path, e.state())
}

// TestServerNameFoundAtStartOfAnotherVolume: names made by an earlier run
// are found at start. One of a volume whose disk went while volumed was
// down, its kernel name now another volume's disk, is gone when Start
// returns: from the first moment, no open() of it reaches the other
// volume's disk. That volume's own name, proven by its disk's identity, is
// kept, and goes with its disk.
func TestServerNameFoundAtStartOfAnotherVolume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var dev *loopdev.Device
	var stale, own string
	e := startServe(t, func(dir string) {
		testenv.RequireLoopControl(t)
		vol := uuid.NewString()
		dev = testloop.Volume(ctx, t, t.TempDir(), vol)
		stale, own = filepath.Join(dir, devagent.PersistentName(uuid.NewString())), filepath.Join(dir, devagent.PersistentName(vol))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, link := range []string{stale, own} {
			if err := os.Symlink(dev.Path, link); err != nil {
				t.Fatal(err)
			}
		}
	}, nil)
	if target, err := os.Readlink(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("name %s found at start still there when Start returned (-> %q, %v): an open() of it opens %s, another volume's disk",
			stale, target, err, dev.Path)
	}
	if target, err := os.Readlink(own); err != nil || target != dev.Path {
		t.Fatalf("name %s of the disk found at start: -> %q, %v; want kept -> %s", own, target, err, dev.Path)
	}
	if err := dev.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := os.Lstat(own)
		return errors.Is(err, os.ErrNotExist)
	}, "name %s found at start removed with its disk %s; the log:\n%s", own, dev.Path, e.log)
}

// TestServerDMNames runs the names requests through a DMNamer on the fake
// dmsetup (the real dm path is untested here): a stale dm device found at
// start (over no present disk) is removed by Start, the requested one
// made, and removed when its device goes away.
func TestServerDMNames(t *testing.T) {
	fake := devagent.NewFakeDM(t)
	stale := "volaaaaaaaa"
	fake.SetTable(t, stale, "0 8 linear 7:4095 0")
	e := startServe(t, nil, devagent.NewDMNamer(fake.Bin, ""))
	if table, found := fake.Tables(t)[stale]; found {
		t.Fatalf("stale dm device %s (%s) found at start kept", stale, table)
	}
	name := devagent.PersistentName(e.volume)
	body, err := json.Marshal(devagent.NamesMessage{Names: map[string]string{name: e.dev.Path}})
	if err != nil {
		t.Fatal(err)
	}
	var reply devagent.NamesMessage
	if err := json.Unmarshal(e.request(t, commands.DevicesNamesSubject(e.vm), body), &reply); err != nil {
		t.Fatal(err)
	}
	if reply.Error != "" || reply.Dir != devagent.DMDir || len(reply.Names) != 1 || reply.Names[name] != e.dev.Path {
		t.Fatalf("reply = %+v, want %s -> %s in %s", reply, name, e.dev.Path, devagent.DMDir)
	}
	want := map[string]string{name: devagent.WholeDeviceTable(t, e.dev.Path, 3<<20)}
	if got := fake.Tables(t); !maps.Equal(got, want) {
		t.Fatalf("dm devices %v, want %v", got, want)
	}

	if err := e.dev.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return len(fake.Tables(t)) == 0 },
		"dm device %s of removed device %s removed; %v", name, e.dev.Path, e.state())
}

// TestServerNameFollowsIdentity gives the names requests the identity of
// the disk: a name is not made on another disk under the same kernel
// name, and when the loop device is rebound to another volume's file the
// name is removed when it is cleared, before the new file is bound, and
// is not made again for the old identity.
func TestServerNameFollowsIdentity(t *testing.T) {
	e := startServe(t, nil, nil)
	add := e.event(t, commands.DeviceAdd)
	id := add.Identity()
	if id.DiskSeq == 0 {
		t.Fatalf("add %+v has no diskseq", add)
	}
	name := devagent.PersistentName(e.volume)
	link := filepath.Join(e.names, name)
	names := func(id commands.DeviceIdentity) devagent.NamesMessage {
		t.Helper()
		body, err := json.Marshal(devagent.NamesMessage{Names: map[string]string{name: e.dev.Path},
			Identities: map[string]commands.DeviceIdentity{name: id}})
		if err != nil {
			t.Fatal(err)
		}
		var reply devagent.NamesMessage
		if err := json.Unmarshal(e.request(t, commands.DevicesNamesSubject(e.vm), body), &reply); err != nil {
			t.Fatal(err)
		}
		return reply
	}
	if r := names(id); r.Names[name] != e.dev.Path {
		t.Fatalf("names with the disk's identity: %+v", r)
	}
	stale := id
	stale.DiskSeq--
	if r := names(stale); r.Skipped[name] == "" || len(r.Names) != 0 {
		t.Fatalf("names with an older diskseq: %+v, want %s skipped", r, name)
	}
	if _, err := os.Lstat(link); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("name for a stale identity kept: %v", err)
	}
	wrongName := id
	wrongName.Name = "loop99999"
	if r := names(wrongName); r.Error == "" {
		t.Fatalf("identity of another kernel name accepted: %+v", r)
	}
	if r := names(id); r.Names[name] != e.dev.Path {
		t.Fatalf("names with the disk's identity again: %+v", r)
	}

	other := filepath.Join(t.TempDir(), "vol-"+uuid.NewString()+".img")
	if err := os.WriteFile(other, []byte("OTHER VOLUME"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(other, 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.dev.Unbind(); err != nil {
		t.Fatal(err)
	}
	// The clear (size 0) is the disk's removal: its name goes with it,
	// before the kernel can give the name to the next volume.
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := os.Lstat(link)
		return errors.Is(err, os.ErrNotExist)
	}, "name of the cleared %s removed; %v", e.dev.Path, e.state())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.dev.Bind(ctx, other); err != nil {
		t.Fatal(err)
	}
	if f, err := os.Open(link); err == nil {
		buf := make([]byte, 12)
		_, _ = io.ReadFull(f, buf)
		f.Close()
		t.Fatalf("%s opens after its disk was rebound (read %q)", link, buf)
	}
	if r := names(id); r.Skipped[name] == "" {
		t.Fatalf("name made again for the old identity on the rebound disk: %+v", r)
	}
}

// scanOnly is an EventSource that delivers no uevent (as after a socket
// overflow): each value sent on overflow makes the agent rescan.
type scanOnly struct {
	overflow chan struct{}
	closed   chan struct{}
	once     sync.Once
}

func (s *scanOnly) Receive() (devagent.Uevent, error) {
	select {
	case <-s.overflow:
		return devagent.Uevent{}, errors.New("no buffer space available")
	case <-s.closed:
		return devagent.Uevent{}, devagent.ErrSourceClosed
	}
}

func (s *scanOnly) Close() error {
	s.once.Do(func() { close(s.closed) })
	return nil
}

// TestServerNameRemovedByScan rebinds a named loop device to another
// volume's file while the agent sees no uevent: the next scan publishes
// the remove and then the add, in order, and the name is gone.
func TestServerNameRemovedByScan(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	b := testenv.StartBus(t)
	vm, vol := uuid.NewString(), uuid.NewString()
	dir := t.TempDir()
	first, second := testloop.File(t, dir, vol), testloop.File(t, dir, uuid.NewString())
	dev, err := loopdev.Create(ctx, first)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dev.Remove(context.Background()) })
	src := &scanOnly{overflow: make(chan struct{}), closed: make(chan struct{})}
	names := filepath.Join(dir, "by-volume")
	agent := startScanOnly(ctx, t, b, devagent.Config{VMID: vm, Source: src, ScanInterval: time.Hour, Logger: quiet}, names)

	known, ok := agent.Device(dev.Name())
	if !ok {
		t.Fatalf("%s not found by the first scan", dev.Path)
	}
	name := devagent.PersistentName(vol)
	body, _ := json.Marshal(devagent.NamesMessage{Names: map[string]string{name: dev.Path},
		Identities: map[string]commands.DeviceIdentity{name: known.Identity()}})
	msg, err := b.Conn().Request(commands.DevicesNamesSubject(vm), body, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var reply devagent.NamesMessage
	if err := json.Unmarshal(msg.Data, &reply); err != nil || reply.Names[name] != dev.Path {
		t.Fatalf("names reply %s (%v)", msg.Data, err)
	}

	if err := dev.Unbind(); err != nil {
		t.Fatal(err)
	}
	if err := dev.Bind(ctx, second); err != nil {
		t.Fatal(err)
	}
	src.overflow <- struct{}{}
	link := filepath.Join(names, name)
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := os.Lstat(link)
		return errors.Is(err, os.ErrNotExist)
	}, "name of the rebound %s removed by the scan", dev.Path)

	cons, err := b.JetStream().OrderedConsumer(ctx, bus.StreamDevices, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{"devices." + vm + ".*"}})
	if err != nil {
		t.Fatal(err)
	}
	// The disk's first add was the agent's start scan, before the server
	// subscribed: the stream holds what came after.
	var got []commands.Device
	for len(got) < 2 {
		m, err := cons.Next(jetstream.FetchContext(ctx))
		if err != nil {
			t.Fatalf("stored events %+v: %v", got, err)
		}
		var d commands.Device
		if err := json.Unmarshal(m.Data(), &d); err != nil {
			t.Fatal(err)
		}
		if d.Name == dev.Name() {
			got = append(got, d)
		}
	}
	switch {
	case got[0].Action != commands.DeviceRemove || got[0].Identity() != known.Identity() || got[0].BackingFile != first:
		t.Fatalf("first event %+v, want the remove of %v", got[0], known.Identity())
	case got[1].Action != commands.DeviceAdd || got[1].BackingFile != second || got[1].DiskSeq == known.DiskSeq:
		t.Fatalf("second event %+v, want the add of %s with a new diskseq", got[1], second)
	case got[1].EventSeq != got[0].EventSeq+1:
		t.Fatalf("event numbers %d then %d", got[0].EventSeq, got[1].EventSeq)
	}
}

// TestServerNamesOnlyForKnownDisks: a name is made only for a disk the
// agent knows, for the agent's remove of it to take the name with it. The
// agent here gets no uevent, so a disk made after its start scan is
// unknown to it: a names request for the disk has the agent rescan and
// then makes the name, and the disk going away takes the name with it at
// the next scan. A disk the agent never knows (it ignores it) gets no
// name.
func TestServerNamesOnlyForKnownDisks(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	log := &testenv.Buffer{}
	logger := slog.New(slog.NewTextHandler(log, nil))
	b := testenv.StartBus(t)
	vm, dir := uuid.NewString(), t.TempDir()
	var hidden atomic.Pointer[string]
	src := &scanOnly{overflow: make(chan struct{}), closed: make(chan struct{})}
	names := filepath.Join(dir, "by-volume")
	agent := startScanOnly(ctx, t, b, devagent.Config{VMID: vm, Source: src, ScanInterval: time.Hour, Logger: logger,
		Ignore: func(name string) bool { h := hidden.Load(); return h != nil && *h == name }}, names)
	create := func() (*loopdev.Device, string) {
		t.Helper()
		vol := uuid.NewString()
		return testloop.Volume(ctx, t, dir, vol), devagent.PersistentName(vol)
	}
	request := func(name, target string) devagent.NamesMessage {
		t.Helper()
		body, _ := json.Marshal(devagent.NamesMessage{Names: map[string]string{name: target}})
		msg, err := b.Conn().Request(commands.DevicesNamesSubject(vm), body, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var reply devagent.NamesMessage
		if err := json.Unmarshal(msg.Data, &reply); err != nil {
			t.Fatal(err)
		}
		return reply
	}

	dev, name := create()
	if d, ok := agent.Device(dev.Name()); ok {
		t.Fatalf("%s known before any scan: %+v", dev.Path, d)
	}
	if r := request(name, dev.Path); r.Names[name] != dev.Path {
		t.Fatalf("names reply %+v, want %s -> %s", r, name, dev.Path)
	}
	if err := dev.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	src.overflow <- struct{}{}
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := os.Lstat(filepath.Join(names, name))
		return errors.Is(err, os.ErrNotExist)
	}, "name of the removed %s removed at the scan; the log:\n%s", dev.Path, log)

	dev, name = create()
	n := dev.Name()
	hidden.Store(&n)
	r := request(name, dev.Path)
	if len(r.Names) != 0 || !strings.Contains(r.Skipped[name], "agent") {
		t.Fatalf("names reply %+v, want %s skipped: the agent does not know %s", r, name, dev.Path)
	}
	if _, err := os.Lstat(filepath.Join(names, name)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("name of %s, unknown to the agent, made: %v", dev.Path, err)
	}
}

// users asks the server who uses the disk of id.
func (e *serveEnv) users(t *testing.T, id commands.DeviceIdentity) devagent.UsersReply {
	t.Helper()
	body, _ := json.Marshal(devagent.UsersRequest{Identity: id})
	var rep devagent.UsersReply
	if err := json.Unmarshal(e.request(t, commands.DevicesUsersSubject(e.vm), body), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Error != "" {
		t.Fatalf("users of %s: %s", id, rep.Error)
	}
	return rep
}

// TestServerUsers: on a real loop device, the users request names a
// process holding it open (pid and command), not this process's own open
// file, and says gone for another appearance of the disk.
func TestServerUsers(t *testing.T) {
	e := startServe(t, nil, nil)
	id := e.event(t, commands.DeviceAdd).Identity()
	if rep := e.users(t, id); len(rep.Users) != 0 || rep.Gone {
		t.Fatalf("unused disk: %+v", rep)
	}
	own, err := os.Open(e.dev.Path) // this process is the agent's: not a user
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	holder := exec.Command("sh", "-c", "exec 3<"+e.dev.Path+"; exec sleep 600")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	want := commands.DeviceUser{Kind: commands.UserProcess, Device: e.dev.Path, PID: holder.Process.Pid, Command: "sleep"}
	testenv.Eventually(t, 10*time.Second, func() bool {
		rep := e.users(t, id)
		return len(rep.Users) == 1 && rep.Users[0] == want
	}, "users of %s: want only %+v", e.dev.Path, want)
	_ = holder.Process.Kill()
	_ = holder.Wait()
	if rep := e.users(t, id); len(rep.Users) != 0 {
		t.Fatalf("after the holder ended: %+v", rep)
	}
	other := id
	other.DiskSeq, other.Generation = id.DiskSeq+1000, id.Generation+1000
	if rep := e.users(t, other); !rep.Gone {
		t.Fatalf("another appearance of %s: %+v, want gone", id.Name, rep)
	}
}

// TestServerAnswersOnInboxesOnly: in volumed the server answers with the
// daemon's identity, so a request whose reply subject is not an inbox (an
// agent of the same VM may send one) gets nothing published there; a
// request on an inbox is answered.
func TestServerAnswersOnInboxesOnly(t *testing.T) {
	e := startServe(t, nil, nil)
	probe, err := e.nc.SubscribeSync("volumed.probe")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.nc.PublishRequest(commands.DevicesListSubject(e.vm), "volumed.probe", nil); err != nil {
		t.Fatal(err)
	}
	// Answered after the probe (one subscription, in order); the flush
	// then has any answer to the probe delivered.
	e.request(t, commands.DevicesListSubject(e.vm), nil)
	if err := e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if n, _, err := probe.Pending(); err != nil || n != 0 {
		t.Fatalf("%d messages published on the probe's reply subject (%v), want none", n, err)
	}
}

// startScanOnly starts an agent of cfg and a names server on it making
// names in dir, both closed at the end of the test.
func startScanOnly(ctx context.Context, t *testing.T, b *bus.Bus, cfg devagent.Config, dir string) *devagent.Agent {
	t.Helper()
	agent := devagent.New(cfg)
	if err := agent.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Close(context.Background()) })
	srv := devagent.NewServer(devagent.ServerConfig{VMID: cfg.VMID, Conn: b.Conn(), JetStream: b.JetStream(),
		Agent: agent, Namer: devagent.NewNamer(dir), Logger: cfg.Logger})
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })
	return agent
}
