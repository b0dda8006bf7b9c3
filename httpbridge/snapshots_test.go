package httpbridge_test

import (
	"net/http"
	"testing"

	"github.com/volumed/volumed/commands"
)

// TestLifecycleEndpoints: the snapshot, revert, resize, tags and volume
// list routes answer as the OpenAPI document says (every response is
// validated against it), merge the path's id into the command, and
// refuse bad input with the field.
func TestLifecycleEndpoints(t *testing.T) {
	h := newHarness(t, options{})
	cases := []endpointCase{
		{name: "snapshot", method: "POST", path: "/volumes/" + vol1 + "/snapshots", body: "snapshot.json", status: http.StatusCreated,
			check: accepted(commands.OpSnapshot, vol1, "", map[string]any{"name": "before-test", "volume_id": vol1})},
		{name: "snapshot without body", method: "POST", path: "/volumes/" + vol1 + "/snapshots", status: http.StatusCreated,
			check: accepted(commands.OpSnapshot, vol1, "", map[string]any{"volume_id": vol1})},
		{name: "snapshot quiesce", method: "POST", path: "/volumes/" + vol1 + "/snapshots", body: "snapshot_quiesce.json",
			status: http.StatusCreated, check: accepted(commands.OpSnapshot, vol1, "", map[string]any{"quiesce": true, "volume_id": vol1})},
		{name: "snapshot of unknown volume", method: "POST", path: "/volumes/" + volUnknown + "/snapshots", status: http.StatusNotFound,
			code: commands.CodeNotFound},
		{name: "list snapshots", method: "GET", path: "/volumes/" + vol1 + "/snapshots", status: http.StatusOK,
			check: func(t *testing.T, body []byte) {
				if s := decodeAs[[]commands.Snapshot](t, body); len(s) != 1 || s[0].ID != snap1 || s[0].VolumeID != vol1 {
					t.Errorf("snapshots %+v", s)
				}
			}},
		{name: "list no snapshots", method: "GET", path: "/volumes/" + vol2 + "/snapshots", status: http.StatusOK,
			check: func(t *testing.T, body []byte) {
				if string(body) != "[]" {
					t.Errorf("body %s, want []", body)
				}
			}},
		{name: "get snapshot", method: "GET", path: "/snapshots/snap-" + snap1, status: http.StatusOK,
			check: func(t *testing.T, body []byte) {
				if s := decodeAs[commands.Snapshot](t, body); s.ID != snap1 || s.State != "BackedUp" {
					t.Errorf("snapshot %+v", s)
				}
			}},
		{name: "get unknown snapshot", method: "GET", path: "/snapshots/" + volUnknown, status: http.StatusNotFound, code: commands.CodeNotFound},
		{name: "get bad snapshot id", method: "GET", path: "/snapshots/nope", status: http.StatusBadRequest,
			code: commands.CodeInvalidRequest, field: "snapshot_id"},
		{name: "delete snapshot", method: "DELETE", path: "/snapshots/" + snap1, status: http.StatusCreated,
			check: accepted(commands.OpDeleteSnapshot, vol1, "", map[string]any{"snapshot_id": snap1})},
		{name: "delete unknown snapshot", method: "DELETE", path: "/snapshots/" + volUnknown, status: http.StatusNotFound,
			code: commands.CodeNotFound},
		{name: "revert", method: "POST", path: "/volumes/" + vol1 + "/revert", body: "revert.json", status: http.StatusCreated,
			check: accepted(commands.OpRevert, vol1, "", map[string]any{"snapshot_id": snap1, "volume_id": vol1})},
		{name: "revert without snapshot", method: "POST", path: "/volumes/" + vol1 + "/revert", body: "empty_object.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "snapshot_id"},
		{name: "resize", method: "POST", path: "/volumes/" + vol1 + "/resize", body: "resize.json", status: http.StatusCreated,
			check: accepted(commands.OpResize, vol1, "", map[string]any{"size": float64(10737418240), "shrink_ok": false})},
		{name: "resize too small", method: "POST", path: "/volumes/" + vol1 + "/resize", body: "resize_too_small.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "size"},
		{name: "resize without size", method: "POST", path: "/volumes/" + vol1 + "/resize", body: "empty_object.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "size"},
		{name: "tags", method: "PUT", path: "/volumes/" + vol1 + "/tags", body: "tags.json", status: http.StatusCreated,
			check: accepted(commands.OpTags, vol1, "", map[string]any{"volume_id": vol1})},
		{name: "tags empty value", method: "PUT", path: "/volumes/" + vol1 + "/tags", body: "tags_empty_value.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "tags"},
		{name: "tags by POST", method: "POST", path: "/volumes/" + vol1 + "/tags", body: "tags.json",
			status: http.StatusMethodNotAllowed, code: commands.CodeInvalidRequest},
		{name: "create from snapshot", method: "POST", path: "/volumes", body: "create_from_snapshot.json", status: http.StatusCreated,
			check: accepted(commands.OpCreate, "", "", map[string]any{"snapshot_id": snap1, "name": "from-snap"})},
		{name: "create metadata not strings", method: "POST", path: "/volumes", body: "create_metadata_number.json",
			status: http.StatusBadRequest, code: commands.CodeInvalidRequest, field: "metadata"},
		{name: "list volumes by tag", method: "GET", path: "/volumes?tag=env=test", status: http.StatusOK,
			check: func(t *testing.T, body []byte) {
				if v := decodeAs[[]commands.VolumeStatus](t, body); len(v) != 1 || v[0].VolumeID != vol2 || v[0].Tags["env"] != "test" {
					t.Errorf("volumes %+v", v)
				}
			}},
		{name: "list volumes paged", method: "GET", path: "/volumes?limit=1", status: http.StatusOK,
			check: func(t *testing.T, body []byte) {
				if v := decodeAs[[]commands.VolumeStatus](t, body); len(v) != 1 || v[0].VolumeID != vol1 {
					t.Errorf("volumes %+v", v)
				}
			}},
		{name: "list volumes bad tag", method: "GET", path: "/volumes?tag=env", status: http.StatusBadRequest,
			code: commands.CodeInvalidRequest, field: "tag"},
		{name: "list volumes bad cursor", method: "GET", path: "/volumes?cursor=x", status: http.StatusBadRequest,
			code: commands.CodeInvalidRequest, field: "cursor"},
	}
	runCases(t, h, cases)
}
