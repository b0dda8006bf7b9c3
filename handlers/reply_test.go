package handlers_test

import (
	"context"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestCommandWithVolumedReplySubject: a command whose reply subject is one
// only volumed may publish to (here the state record of a mapping, in the
// KV bucket) is refused and not run: the record is not overwritten with
// the answer, and no operation is recorded. It counts as an error answer.
func TestCommandWithVolumedReplySubject(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	vol, before := h.mappedVolume(t)
	data, _ := json.Marshal(createBody("injected"))
	msg := &nats.Msg{Subject: commands.SubjectCreate, Reply: "$KV." + state.DefaultKVBucket + ".map." + vol, Data: data}
	if err := h.nc.PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		var d map[string]int64
		st := h.stats()
		return len(st.Endpoints) > 0 && json.Unmarshal(st.Endpoints[0].Data, &d) == nil && d["errors"] == 1
	}, "the command refused, counted as an error")
	after, err := h.store.GetMapping(ctx, vol)
	if err != nil || !reflect.DeepEqual(after, before) {
		t.Fatalf("mapping after the command: %+v %v, want it unchanged %+v", after, err, before)
	}
	if ops, _, err := h.store.ListOperations(ctx, state.Filter{}); err != nil || len(ops) != 0 {
		t.Fatalf("operations recorded: %d %v, want none", len(ops), err)
	}
}

// TestDiscoveryReplySubject: service discovery ($SRV.PING), which even the
// read-only observer may request, is answered on the command service's
// connection (bus.ServiceConn), which may publish on inboxes only: a ping
// whose reply subject is a state record's has nothing published there,
// and the record stays as it was.
func TestDiscoveryReplySubject(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	vol, before := h.mappedVolume(t)
	record := "$KV." + state.DefaultKVBucket + ".map." + vol
	watch, err := h.bus.Conn().SubscribeSync(record)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.bus.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	observer := testenv.Connect(t, h.bus, bus.RoleObserver)
	if err := observer.PublishMsg(&nats.Msg{Subject: "$SRV.PING", Reply: record}); err != nil {
		t.Fatal(err)
	}
	// The same subscription answers this ping after the forged one; once
	// its answer is here, the forged one was published, or refused.
	if _, err := observer.Request("$SRV.PING", nil, 5*time.Second); err != nil {
		t.Fatalf("ping: %v", err)
	}
	if err := h.bus.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	if n, _, _ := watch.Pending(); n != 0 {
		m, _ := watch.NextMsg(0)
		t.Fatalf("the service published on %s: %s", record, m.Data)
	}
	after, err := h.store.GetMapping(ctx, vol)
	if err != nil || !reflect.DeepEqual(after, before) {
		t.Fatalf("mapping after the ping: %+v %v, want it unchanged %+v", after, err, before)
	}
}

// mappedVolume creates a volume and records a mapping of it to the remote
// VM, returned as recorded.
func (h *harness) mappedVolume(t *testing.T) (string, commands.Mapping) {
	t.Helper()
	vol, now := h.createVolume("mapped"), time.Now().UTC().Truncate(time.Second)
	m, err := h.store.PutMapping(context.Background(), commands.Mapping{ID: "mapping-" + vol, VolumeID: vol, VMID: cloudsim.RemoteVMID,
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxNotApplicable, LastSync: now, CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	return vol, m
}
