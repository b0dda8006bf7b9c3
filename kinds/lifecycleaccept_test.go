package kinds_test

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
)

// TestLifecycleAccept: the new commands' synchronous answers: bad input
// is 400 with its field, what CloudStack would refuse at once is 404 or
// 422 with CloudStack's code, and delete_snapshot records the line of the
// snapshot's volume.
func TestLifecycleAccept(t *testing.T) {
	w := newLife(t, false)
	vol, other := w.readyVolume(""), w.readyVolume("")
	snap, otherSnap := w.snapshotOf(vol, "s"), w.snapshotOf(other, "o")
	w.wait(w.cloud.ResizeVolume(w.ctx, vol, 3, false))
	unknown := "00000000-0000-4000-8000-000000000000"
	for _, tc := range []struct {
		name    string
		subject string
		body    any
		status  int // of the refusal, decoded or checked; 0 for none
		field   string
		csCode  int
		volume  string // recorded, when accepted
	}{
		{"snapshot", commands.SubjectSnapshot, map[string]any{"volume_id": vol, "name": "x"}, 0, "", 0, vol},
		{"snapshot of an unknown volume", commands.SubjectSnapshot, map[string]any{"volume_id": unknown}, 404, "", 0, ""},
		{"snapshot quiesced", commands.SubjectSnapshot, map[string]any{"volume_id": vol, "quiesce": true}, 0, "", 0, vol},
		{"snapshot with a blank name", commands.SubjectSnapshot, map[string]any{"volume_id": vol, "name": " "}, 400, "name", 0, ""},
		{"delete_snapshot: the snapshot's volume's line", commands.SubjectDeleteSnapshot, map[string]any{"snapshot_id": otherSnap}, 0, "", 0, other},
		{"delete_snapshot of an unknown snapshot", commands.SubjectDeleteSnapshot, map[string]any{"snapshot_id": unknown}, 404, "", 0, ""},
		{"delete_snapshot with a bad id", commands.SubjectDeleteSnapshot, map[string]any{"snapshot_id": "x"}, 400, "snapshot_id", 0, ""},
		{"revert", commands.SubjectRevert, map[string]any{"volume_id": vol, "snapshot_id": snap}, 0, "", 0, vol},
		{"revert to another volume's snapshot", commands.SubjectRevert, map[string]any{"volume_id": vol, "snapshot_id": otherSnap}, 400, "snapshot_id", 0, ""},
		{"revert to an unknown snapshot", commands.SubjectRevert, map[string]any{"volume_id": vol, "snapshot_id": unknown}, 404, "", 0, ""},
		{"resize", commands.SubjectResize, map[string]any{"volume_id": vol, "size": 4 << 30}, 0, "", 0, vol},
		{"shrink without shrink_ok", commands.SubjectResize, map[string]any{"volume_id": vol, "size": 2 << 30}, 422, "", 431, ""},
		{"shrink with shrink_ok", commands.SubjectResize, map[string]any{"volume_id": vol, "size": 2 << 30, "shrink_ok": true}, 0, "", 0, vol},
		{"resize without size", commands.SubjectResize, map[string]any{"volume_id": vol}, 400, "size", 0, ""},
		{"resize above 64 TiB", commands.SubjectResize, map[string]any{"volume_id": vol, "size": int64(65) << 40}, 400, "size", 0, ""},
		{"tags", commands.SubjectTags, map[string]any{"volume_id": vol, "tags": map[string]string{"k": "v"}}, 0, "", 0, vol},
		{"tags of an unknown volume", commands.SubjectTags, map[string]any{"volume_id": unknown, "tags": map[string]string{}}, 404, "", 0, ""},
		{"tags differing in case", commands.SubjectTags, map[string]any{"volume_id": vol, "tags": map[string]string{"k": "v", "K": "w"}}, 400, "tags", 0, ""},
		{"tags with an empty value", commands.SubjectTags, map[string]any{"volume_id": vol, "tags": map[string]string{"k": ""}}, 400, "tags", 0, ""},
		{"create from an unknown snapshot", commands.SubjectCreate, map[string]any{"name": "n", "snapshot_id": unknown}, 422, "", 431, ""},
		{"create from a snapshot", commands.SubjectCreate, map[string]any{"name": "n", "snapshot_id": snap}, 0, "", 0, ""},
		{"create with metadata not strings", commands.SubjectCreate, map[string]any{"name": "n", "snapshot_id": snap, "metadata": map[string]any{"n": 1}},
			400, "metadata", 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var a engine.Accepter
			for _, k := range w.engine.Kinds() {
				if acc, ok := k.(engine.Accepter); ok {
					for _, e := range acc.Endpoints() {
						if e.Subject == tc.subject {
							a = acc
						}
					}
				}
			}
			if a == nil {
				t.Fatalf("no kind takes %s", tc.subject)
			}
			data, _ := json.Marshal(tc.body)
			cmd, err := a.Decode(w.ctx, tc.subject, data)
			if err == nil && cmd.Check != nil {
				err = cmd.Check(w.ctx, w.ctx)
			}
			if tc.status == 0 {
				if err != nil || cmd.VolumeID != tc.volume {
					t.Fatalf("accepted on volume %q, %v; want volume %q", cmd.VolumeID, err, tc.volume)
				}
				return
			}
			e := commands.AsError(err)
			if err == nil || e.Status != tc.status || (tc.field != "" && e.Details["field"] != tc.field) ||
				(tc.csCode != 0 && fmt.Sprint(e.Details["cloudstack_error_code"]) != fmt.Sprint(tc.csCode)) {
				t.Fatalf("answer %v %+v, want %d field %q code %d", err, e, tc.status, tc.field, tc.csCode)
			}
		})
	}
}
