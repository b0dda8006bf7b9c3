package devagent

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// fakeServe is an agent and a server on a copy of the fake sysfs tree,
// the agent's uevents injected by the test.
type fakeServe struct {
	root, names string
	src         *fakeSource
	agent       *Agent
	nc          *nats.Conn
}

// startFakeServe starts them; found, if set, is the names (name → target)
// present before the server starts, and js, if set, what the server
// publishes to.
func startFakeServe(t *testing.T, found map[string]string, js jetstream.JetStream) *fakeServe {
	t.Helper()
	f := newFakeServe(t, found, nil)
	f.serve(t, js, NewNamer(f.names))
	return f
}

// newFakeServe starts the agent, hiding from it the disks ignore names
// (if set), and makes the names found; serve starts the server.
func newFakeServe(t *testing.T, found map[string]string, ignore func(string) bool) *fakeServe {
	t.Helper()
	f := &fakeServe{root: copyTree(t), names: filepath.Join(t.TempDir(), "by-volume"), src: newFakeSource()}
	f.agent, _ = startAgent(t, Config{Source: f.src, SysRoot: f.root, Ignore: ignore})
	if err := os.MkdirAll(f.names, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, target := range found {
		if err := os.Symlink(target, filepath.Join(f.names, name)); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// serve starts the server on names; js as for startFakeServe.
func (f *fakeServe) serve(t *testing.T, js jetstream.JetStream, names Names) *Server {
	t.Helper()
	b := testenv.StartBus(t)
	f.nc = b.Conn()
	if js == nil {
		js = b.JetStream()
	}
	srv := NewServer(ServerConfig{VMID: "vm-test", Conn: b.Conn(), JetStream: js, Agent: f.agent,
		Namer: names, SysRoot: f.root, Logger: testLogger(t)})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })
	return srv
}

// name sends the names request req and checks that its names were made.
func (f *fakeServe) name(t *testing.T, req NamesMessage) {
	t.Helper()
	body, _ := json.Marshal(req)
	msg, err := f.nc.Request(commands.DevicesNamesSubject("vm-test"), body, wait)
	if err != nil {
		t.Fatal(err)
	}
	var reply NamesMessage
	if err := json.Unmarshal(msg.Data, &reply); err != nil || !maps.Equal(reply.Names, req.Names) {
		t.Fatalf("names reply %s (%v), want names %v", msg.Data, err, req.Names)
	}
}

// write sets a file of the fake tree.
func (f *fakeServe) write(t *testing.T, rel, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(filepath.Join(f.root, rel)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(f.root, rel), []byte(content+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// waitGone waits for the name to be removed.
func (f *fakeServe) waitGone(t *testing.T, name, why string) {
	t.Helper()
	testenv.Eventually(t, wait, func() bool {
		_, err := os.Lstat(filepath.Join(f.names, name))
		return errors.Is(err, os.ErrNotExist)
	}, "%s removed: %s", name, why)
}

// vdaSize is the size file of the fake tree's vda, a disk without diskseq.
const vdaSize = "devices/pci0000:00/0000:00:04.0/virtio4/block/vda/size"

// vdaName is the persistent name the fake tree's vda carries: its serial
// is 0d3f5e6a7b8c4d2e9f10.
const vdaName = "vol0d3f5e6a"

// TestServerNameOfDiskWithoutDiskseq: on the fake sysfs tree, whose vda
// has no kernel diskseq (the agent numbers its appearances), a name made
// for vda, with or without the identity in the request, goes when the
// agent reports vda removed: the server records the disk's identity as
// the agent knows it, generation included.
func TestServerNameOfDiskWithoutDiskseq(t *testing.T) {
	for _, tc := range []struct {
		name         string
		withIdentity bool
	}{
		{"without identity", false},
		{"with identity", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFakeServe(t, nil, nil)
			vda, ok := f.agent.Device("vda")
			if !ok || vda.DiskSeq != 0 || vda.Generation == 0 {
				t.Fatalf("vda = %+v (%v), want a disk without diskseq, with a generation", vda, ok)
			}
			name := vdaName
			req := NamesMessage{Names: map[string]string{name: vda.Path}}
			if tc.withIdentity {
				req.Identities = map[string]commands.DeviceIdentity{name: vda.Identity()}
			}
			f.name(t, req)
			f.write(t, vdaSize, "0")
			f.src.send(t, Uevent{Action: "remove", Subsystem: "block", DevType: "disk", DevName: "vda", Seqnum: 900}, nil)
			f.waitGone(t, name, "vda ("+vda.Identity().String()+") removed")
		})
	}
}

// TestServerNamesFoundAtStart: when Start returns, a name found at start
// is kept only if its target is a present disk the agent knows whose
// kernel identity carries the name (serial, WWID, loop backing file);
// every other is gone. A names request still names a disk without
// identity. A kept name goes when its disk is removed.
func TestServerNamesFoundAtStart(t *testing.T) {
	found := map[string]string{
		vdaName:       "/dev/vda",   // vda's serial
		"vol5e1f0c2a": "/dev/sda",   // sda's WWID ends in 5e1f0c2a9d8b47c6a3e1
		"vol7c9e6679": "/dev/loop3", // loop3's backing file vol-7c9e6679-….img
		"volaaaaaaaa": "/dev/vda",   // another volume's disk now
		"volbbbbbbbb": "/dev/loop4", // no disk
		"volcccccccc": "/dev/dm-1",  // a disk without identity: unproven
	}
	kept := map[string]string{vdaName: "/dev/vda", "vol5e1f0c2a": "/dev/sda", "vol7c9e6679": "/dev/loop3"}
	f := startFakeServe(t, found, nil)
	if got := f.held(t); !maps.Equal(got, kept) {
		t.Fatalf("names when Start returned %v, want %v", got, kept)
	}
	f.name(t, NamesMessage{Names: map[string]string{vdaName: "/dev/vda", "volcccccccc": "/dev/dm-1"}})
	f.write(t, vdaSize, "0")
	f.src.send(t, Uevent{Action: "remove", Subsystem: "block", DevType: "disk", DevName: "vda", Seqnum: 900}, nil)
	f.waitGone(t, vdaName, "vda removed")
}

// held returns the names in the names directory: name → target.
func (f *fakeServe) held(t *testing.T) map[string]string {
	t.Helper()
	names, err := NewNamer(f.names).List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// listHook is a Names whose List first calls before.
type listHook struct {
	Names
	before func()
}

func (h listHook) List(ctx context.Context) (map[string]string, error) {
	h.before()
	return h.Names.List(ctx)
}

// vdaSerial is the serial file of the fake tree's vda.
const vdaSerial = "devices/pci0000:00/0000:00:04.0/virtio4/block/vda/serial"

// TestServerNameFoundAtStartOfReplacedDisk: a name found at start, of the
// disk its kernel name had before, does not pass to another volume's disk
// that replaces it while the server starts (its remove and the new disk's
// add already emitted): it is gone when Start returns.
func TestServerNameFoundAtStartOfReplacedDisk(t *testing.T) {
	const name = vdaName // of vda's serial before it is replaced
	f := newFakeServe(t, map[string]string{name: "/dev/vda"}, nil)
	vda, ok := f.agent.Device("vda")
	if !ok {
		t.Fatal("vda not found")
	}
	replace := func() {
		f.write(t, vdaSerial, "other-volume-serial")
		f.src.send(t, Uevent{Action: "change", Subsystem: "block", DevType: "disk", DevName: "vda", Seqnum: 900}, nil)
		testenv.Eventually(t, wait, func() bool { d, _ := f.agent.Device("vda"); return d.Serial != vda.Serial },
			"vda replaced by another disk")
	}
	f.serve(t, nil, listHook{Names: NewNamer(f.names), before: sync.OnceFunc(replace)})
	if got := f.held(t); len(got) != 0 {
		t.Fatalf("names when Start returned %v; want none: the disk %s was found for, vda %s, was replaced", got, name, vda.Identity())
	}
}

// TestServerClosedMakesNoNames: a names request still waiting for the
// agent when the server closes makes no name, not even for the disks the
// agent knows: no one would drop it when its disk goes.
func TestServerClosedMakesNoNames(t *testing.T) {
	f := newFakeServe(t, nil, func(name string) bool { return name == "loop4" })
	srv := f.serve(t, nil, NewNamer(f.names))
	f.write(t, "devices/virtual/block/loop4/size", "2048")
	subs := func() int { f.agent.mu.Lock(); defer f.agent.mu.Unlock(); return len(f.agent.subs) }
	before := subs()
	known, hidden := vdaName, "volbbbbbbbb"
	body, _ := json.Marshal(NamesMessage{Names: map[string]string{known: "/dev/vda", hidden: "/dev/loop4"}})
	replies := make(chan *nats.Msg, 1)
	sub, err := f.nc.ChanSubscribe(nats.NewInbox(), replies)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := f.nc.PublishRequest(commands.DevicesNamesSubject("vm-test"), sub.Subject, body); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, wait, func() bool { return subs() > before }, "the names request waits for the agent to know loop4")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := srv.Close(ctx); err != nil {
		t.Fatal(err)
	}
	var reply NamesMessage
	select {
	case msg := <-replies:
		if err := json.Unmarshal(msg.Data, &reply); err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("no reply to the names request")
	}
	if _, err := os.Lstat(filepath.Join(f.names, known)); !errors.Is(err, os.ErrNotExist) || reply.Error == "" {
		t.Fatalf("names request in flight at Close: reply %+v, name %s: %v; want an error and no name", reply, known, err)
	}
}

// stalledJetStream is a JetStream whose publishes hang until their
// context ends, as when the stream has lost its quorum.
type stalledJetStream struct {
	jetstream.JetStream
}

func (stalledJetStream) Publish(ctx context.Context, _ string, _ []byte, _ ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// TestServerNameGoesWhilePublishStalls: while JetStream does not store
// the agent's events (each publish waits out its timeout and is retried),
// a removed disk's name goes at once, not after the events before its
// removal are published.
func TestServerNameGoesWhilePublishStalls(t *testing.T) {
	f := startFakeServe(t, nil, stalledJetStream{})
	vda, ok := f.agent.Device("vda")
	if !ok {
		t.Fatal("vda not found")
	}
	name := vdaName
	f.name(t, NamesMessage{Names: map[string]string{name: vda.Path}})
	f.write(t, vdaSize, strconv.FormatInt(2*vda.Size/512, 10))
	f.src.send(t, Uevent{Action: "change", Subsystem: "block", DevType: "disk", DevName: "vda", Seqnum: 900}, nil)
	testenv.Eventually(t, wait, func() bool { d, _ := f.agent.Device("vda"); return d.Size == 2*vda.Size },
		"vda's growth handled")
	f.write(t, vdaSize, "0")
	f.src.send(t, Uevent{Action: "remove", Subsystem: "block", DevType: "disk", DevName: "vda", Seqnum: 901}, nil)
	f.waitGone(t, name, "vda removed while its change is being published")
}
