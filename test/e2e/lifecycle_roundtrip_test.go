package e2e_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestLifecycleNATS: snapshot, revert, resize, tags and delete_snapshot
// through their NATS subjects, followed on volumes.ops.<id>, and the
// Prometheus counters of their types.
func TestLifecycleNATS(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.readyVolume("nats-life")
	nc := d.nats()
	events := make(chan commands.Operation, 100)
	sub, err := nc.Subscribe(commands.SubjectOpsPrefix+">", func(m *nats.Msg) {
		var op commands.Operation
		if json.Unmarshal(m.Data, &op) == nil {
			events <- op
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	run := func(subject string, body any) commands.Operation {
		t.Helper()
		status, data := request(t, nc, subject, body)
		var op commands.Operation
		if status != http.StatusCreated || json.Unmarshal(data, &op) != nil {
			t.Fatalf("%s: %d %s", subject, status, data)
		}
		timeout := time.After(30 * time.Second)
		for {
			select {
			case ev := <-events:
				if ev.ID == op.ID && ev.Status.Terminal() {
					if ev.Status != commands.StatusCompleted {
						t.Fatalf("%s: %+v", subject, ev)
					}
					return ev
				}
			case <-timeout:
				t.Fatalf("no terminal event for %s", op.ID)
			}
		}
	}
	snap := run(commands.SubjectSnapshot, map[string]any{"volume_id": vol, "name": "nats-snap"}).Response.SnapshotID
	if grown := run(commands.SubjectResize, map[string]any{"volume_id": vol, "size": 2 << 30}); grown.Response.Size != 2<<30 {
		t.Fatalf("resize: %+v", grown.Response)
	}
	if back := run(commands.SubjectRevert, map[string]any{"volume_id": vol, "snapshot_id": snap}); back.Response.Size != 1<<30 {
		t.Fatalf("revert: %+v", back.Response)
	}
	run(commands.SubjectTags, map[string]any{"volume_id": vol, "tags": map[string]string{"via": "nats"}})
	run(commands.SubjectDeleteSnapshot, map[string]any{"snapshot_id": snap})
	status, data := request(t, nc, commands.SubjectDeleteSnapshot, map[string]any{"snapshot_id": snap})
	if status != http.StatusNotFound || !strings.Contains(string(data), commands.CodeNotFound) {
		t.Fatalf("delete of a deleted snapshot: %d %s", status, data)
	}

	var m commands.Metrics
	d.mustCall(http.StatusOK, http.MethodGet, "/metrics", nil, &m)
	for _, typ := range []commands.OpType{commands.OpSnapshot, commands.OpResize, commands.OpRevert, commands.OpTags, commands.OpDeleteSnapshot} {
		if m.OperationsByType[string(typ)] != 1 {
			t.Errorf("operations_by_type[%s] = %d, want 1", typ, m.OperationsByType[string(typ)])
		}
	}
	for _, typ := range []string{"snapshot", "delete_snapshot", "revert", "resize", "tags"} {
		testenv.Eventually(t, 30*time.Second, func() bool {
			return d.scrape().value("volumed_operations_total", "type", typ, "status", "completed") == 1
		}, "volumed_operations_total{type=%q,status=\"completed\"} = 1", typ)
	}
}

// TestLifecycleVolctl: the same round trip through the volctl binary, with
// --wait.
func TestLifecycleVolctl(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.readyVolume("ctl-life")
	var op commands.Operation
	decodeOut(t, d.mustVolctl(0, "volume", "snapshot", vol, "--name", "ctl-snap", "--wait", "-o", "json"), &op)
	snap := op.Response.SnapshotID
	if op.Type != commands.OpSnapshot || snap == "" {
		t.Fatalf("volume snapshot: %+v", op)
	}
	var list []commands.Snapshot
	decodeOut(t, d.mustVolctl(0, "volume", "snapshots", vol, "-o", "json"), &list)
	if len(list) != 1 || list[0].ID != snap || list[0].Name != "ctl-snap" {
		t.Fatalf("volume snapshots: %+v", list)
	}
	if r := d.mustVolctl(0, "snapshot", "get", snap); !strings.Contains(r.stdout, "ctl-snap") || !strings.Contains(r.stdout, "BackedUp") {
		t.Fatalf("snapshot get: %s", r.stdout)
	}
	decodeOut(t, d.mustVolctl(0, "volume", "resize", vol, "--size", "3GiB", "--wait", "-o", "json"), &op)
	if op.Response.Size != 3<<30 {
		t.Fatalf("volume resize: %+v", op.Response)
	}
	if r := d.mustVolctl(1, "volume", "resize", vol, "--size", "2GiB"); !strings.Contains(r.stderr+r.stdout, commands.CodeCloudStackError) {
		t.Fatalf("shrink without --shrink-ok: %s %s", r.stdout, r.stderr)
	}
	decodeOut(t, d.mustVolctl(0, "volume", "revert", vol, "--snapshot", snap, "--wait", "-o", "json"), &op)
	if op.Type != commands.OpRevert || op.Response.Size != 1<<30 {
		t.Fatalf("volume revert: %+v", op.Response)
	}
	d.mustVolctl(0, "volume", "tags", vol, "--tag", "env=ctl", "--tag", "team=ops", "--wait")
	var vols []commands.VolumeStatus
	decodeOut(t, d.mustVolctl(0, "volume", "list", "--tag", "env=ctl", "-o", "json"), &vols)
	if len(vols) != 1 || vols[0].VolumeID != vol || vols[0].Tags["team"] != "ops" {
		t.Fatalf("volume list --tag: %+v", vols)
	}
	decodeOut(t, d.mustVolctl(0, "volume", "create", "--name", "ctl-clone", "--snapshot", snap, "--wait", "-o", "json"), &op)
	if op.Status != commands.StatusCompleted || op.VolumeID == "" {
		t.Fatalf("volume create --snapshot: %+v", op)
	}
	d.mustVolctl(0, "snapshot", "delete", snap, "--wait")
	d.mustVolctl(1, "snapshot", "get", snap)
	d.mustVolctl(2, "volume", "revert", vol)
}
