package httpbridge_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/apitest"
)

// apiErr is the documented error format, decoded.
type apiErr struct {
	Error   string         `json:"error"`
	Code    string         `json:"code"`
	Details map[string]any `json:"details"`
}

// endpointCase is one request and what must come back.
type endpointCase struct {
	name   string
	method string
	path   string
	// body is a file under testdata/, or "" for none.
	body   string
	status int
	// code and field are the error's code and details.field, if an error.
	code  string
	field string
	check func(t *testing.T, body []byte)
}

func runCases(t *testing.T, h *harness, cases []endpointCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := h.do(t, tc.method, tc.path, readTestdata(t, tc.body))
			if resp.StatusCode != tc.status {
				t.Fatalf("%s %s: status %d, want %d; body %s", tc.method, tc.path, resp.StatusCode, tc.status, body)
			}
			if tc.code != "" {
				var e apiErr
				if err := json.Unmarshal(body, &e); err != nil {
					t.Fatalf("error body %s: %v", body, err)
				}
				if e.Code != tc.code || e.Error == "" {
					t.Errorf("error %+v, want code %s and a message", e, tc.code)
				}
				if tc.field != "" && e.Details["field"] != tc.field {
					t.Errorf("details.field = %v, want %s (%s)", e.Details["field"], tc.field, e.Error)
				}
			}
			if tc.check != nil {
				tc.check(t, body)
			}
		})
	}
}

func decodeAs[T any](t *testing.T, body []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("decode %T from %s: %v", v, body, err)
	}
	return v
}

// accepted checks a 201 answer: a pending operation of typ on volumeID
// (and vmID), whose recorded request has the given fields.
func accepted(typ commands.OpType, volumeID, vmID string, request map[string]any) func(*testing.T, []byte) {
	return func(t *testing.T, body []byte) {
		op := decodeAs[commands.Operation](t, body)
		if op.Type != typ || op.Status != commands.StatusPending || op.VolumeID != volumeID || !strings.HasPrefix(op.ID, "op-") {
			t.Errorf("operation %+v, want pending %s of volume %q", op, typ, volumeID)
		}
		if got := ptr(op.VMID); got != vmID {
			t.Errorf("vm_id %q, want %q", got, vmID)
		}
		req := decodeAs[map[string]any](t, op.Request)
		for k, want := range request {
			if req[k] != want {
				t.Errorf("request.%s = %v, want %v (request %s)", k, req[k], want, op.Request)
			}
		}
	}
}

func ptr(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func TestCommands(t *testing.T) {
	h := newHarness(t, options{})
	oversized := `{"name":"` + strings.Repeat("x", commands.MaxBodyBytes) + `"}`
	runCases(t, h, []endpointCase{
		{name: "create", method: "POST", path: "/volumes", body: "create.json", status: 201,
			check: accepted(commands.OpCreate, "", "", map[string]any{"name": "migration-volume-001", "size": float64(5368709120)})},
		{name: "create unknown field reaches the service's 400", method: "POST", path: "/volumes", body: "create_unknown_field.json",
			status: 400, code: commands.CodeInvalidRequest, field: "colour"},
		{name: "create too small", method: "POST", path: "/volumes", body: "create_too_small.json",
			status: 400, code: commands.CodeInvalidRequest, field: "size"},
		{name: "create malformed JSON", method: "POST", path: "/volumes", body: "malformed.json",
			status: 400, code: commands.CodeInvalidRequest},
		{name: "create empty body", method: "POST", path: "/volumes", status: 400, code: commands.CodeInvalidRequest, field: "name"},
		{name: "attach vol- prefixed path", method: "POST", path: "/volumes/vol-" + vol1 + "/attach", body: "attach.json", status: 201,
			check: accepted(commands.OpAttach, vol1, vm1, map[string]any{"volume_id": vol1, "vm_id": vm1})},
		{name: "attach body names the same volume", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "attach_same_volume.json", status: 201,
			check: accepted(commands.OpAttach, vol1, vm1, map[string]any{"volume_id": vol1})},
		{name: "attach-root upper-case path", method: "POST", path: "/volumes/" + strings.ToUpper(vol1) + "/attach-root", body: "attach.json", status: 201,
			check: accepted(commands.OpAttach, vol1, vm1, map[string]any{"attach_as": "root", "device_id": float64(0)})},
		{name: "detach without body", method: "POST", path: "/volumes/" + vol2 + "/detach", status: 201,
			check: accepted(commands.OpDetach, vol2, "", map[string]any{"volume_id": vol2})},
		{name: "delete", method: "DELETE", path: "/volumes/vol-" + vol2, status: 201,
			check: accepted(commands.OpDelete, vol2, "", map[string]any{"volume_id": vol2})},
		{name: "attach body names another volume", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "attach_other_volume.json",
			status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "attach body volume_id not a string", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "attach_numeric_volume.json",
			status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "attach body is an array", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "array.json",
			status: 400, code: commands.CodeInvalidRequest},
		{name: "attach body is null", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "null.json",
			status: 400, code: commands.CodeInvalidRequest},
		{name: "attach body holds two objects", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "two_objects.json",
			status: 400, code: commands.CodeInvalidRequest},
		{name: "attach malformed JSON", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "malformed.json",
			status: 400, code: commands.CodeInvalidRequest},
		{name: "attach unknown field reaches the service's 400", method: "POST", path: "/volumes/" + vol1 + "/attach", body: "attach_unknown_field.json",
			status: 400, code: commands.CodeInvalidRequest, field: "device"},
		{name: "attach without vm_id", method: "POST", path: "/volumes/" + vol1 + "/attach", status: 400, code: commands.CodeInvalidRequest, field: "vm_id"},
		{name: "attach malformed volume id", method: "POST", path: "/volumes/not-a-uuid/attach", body: "attach.json",
			status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "attach unknown volume is the service's 404", method: "POST", path: "/volumes/" + volUnknown + "/attach", body: "attach.json",
			status: 404, code: commands.CodeNotFound},
		{name: "delete malformed volume id", method: "DELETE", path: "/volumes/vm-" + vol1, status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "force sync", method: "POST", path: "/admin/force-sync", status: 200, check: func(t *testing.T, body []byte) {
			res := decodeAs[commands.SyncResult](t, body)
			if res.Message == "" || res.Changes == nil || res.Timestamp.IsZero() {
				t.Errorf("sync result %s", body)
			}
		}},
	})
	t.Run("oversized body", func(t *testing.T) {
		for _, path := range []string{"/volumes", "/volumes/" + vol1 + "/attach", "/admin/force-sync"} {
			resp, body := h.v.Do(t, nil, apitest.NewRequest(t, "POST", h.base+path, oversized))
			e := decodeAs[apiErr](t, body)
			if resp.StatusCode != 400 || e.Code != commands.CodeInvalidRequest || !strings.Contains(e.Error, "larger than") {
				t.Errorf("POST %s with %d bytes: %d %s", path, len(oversized), resp.StatusCode, body)
			}
		}
	})
	t.Run("accepted operation is readable", func(t *testing.T) {
		_, body := h.do(t, "POST", "/volumes/"+vol1+"/attach", readTestdata(t, "attach.json"))
		op := decodeAs[commands.Operation](t, body)
		resp, got := h.do(t, "GET", "/operations/"+op.ID, "")
		if resp.StatusCode != 200 || decodeAs[commands.Operation](t, got).ID != op.ID {
			t.Errorf("GET /operations/%s: %d %s", op.ID, resp.StatusCode, got)
		}
	})
}

func TestReads(t *testing.T) {
	h := newHarness(t, options{})
	h.seedMapping(t, vol1, "/dev/vdb")
	h.seedMapping(t, vol2, "/dev/disk/by-id/virtio-7d9e1f203b4c4d5e8f6a")
	mappingOf := func(volumeID, dev string) func(*testing.T, []byte) {
		return func(t *testing.T, body []byte) {
			m := decodeAs[commands.Mapping](t, body)
			if m.VolumeID != volumeID || m.DevicePath != dev {
				t.Errorf("mapping %+v, want %s on %s", m, volumeID, dev)
			}
		}
	}
	runCases(t, h, []endpointCase{
		{name: "volume status", method: "GET", path: "/volumes/vol-" + vol1, status: 200, check: func(t *testing.T, body []byte) {
			st := decodeAs[commands.VolumeStatus](t, body)
			if st.VolumeID != vol1 || ptr(st.DevicePath) != "/dev/vdb" || st.CloudStackData == nil || st.LastOperation == nil {
				t.Errorf("status %s", body)
			}
		}},
		{name: "volume status of a detached volume has null vm_id", method: "GET", path: "/volumes/" + vol2, status: 200, check: func(t *testing.T, body []byte) {
			if raw := decodeAs[map[string]any](t, body); raw["vm_id"] != nil || raw["device_path"] != nil {
				t.Errorf("status %s", body)
			}
		}},
		{name: "volume status unknown", method: "GET", path: "/volumes/" + volUnknown, status: 404, code: commands.CodeNotFound},
		{name: "volume status malformed id", method: "GET", path: "/volumes/vol-12345", status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "volume status panics", method: "GET", path: "/volumes/" + volPanic, status: 500, code: commands.CodeInternalError},
		{name: "volume device", method: "GET", path: "/volumes/" + vol1 + "/device", status: 200, check: mappingOf(vol1, "/dev/vdb")},
		{name: "volume device unmapped", method: "GET", path: "/volumes/" + volUnknown + "/device", status: 404, code: commands.CodeNotFound},
		{name: "volume device malformed id", method: "GET", path: "/volumes/x/device", status: 400, code: commands.CodeInvalidRequest},
		{name: "device dev%2Fvdb", method: "GET", path: "/devices/dev%2Fvdb/volume", status: 200, check: mappingOf(vol1, "/dev/vdb")},
		{name: "device %2Fdev%2Fvdb", method: "GET", path: "/devices/%2Fdev%2Fvdb/volume", status: 200, check: mappingOf(vol1, "/dev/vdb")},
		{name: "device by-id path", method: "GET", path: "/devices/dev%2Fdisk%2Fby-id%2Fvirtio-7d9e1f203b4c4d5e8f6a/volume", status: 200,
			check: mappingOf(vol2, "/dev/disk/by-id/virtio-7d9e1f203b4c4d5e8f6a")},
		{name: "device fully encoded", method: "GET", path: "/devices/%2F%64ev%2Fvdb/volume", status: 200, check: mappingOf(vol1, "/dev/vdb")},
		{name: "device unmapped", method: "GET", path: "/devices/dev%2Fvdz/volume", status: 404, code: commands.CodeNotFound},
		{name: "device of the named vm", method: "GET", path: "/devices/dev%2Fvdb/volume?vm_id=vm-" + vm1, status: 200, check: mappingOf(vol1, "/dev/vdb")},
		{name: "the same path on another vm", method: "GET", path: "/devices/dev%2Fvdb/volume?vm_id=" + vmEmpty, status: 404, code: commands.CodeNotFound},
		{name: "device of a malformed vm", method: "GET", path: "/devices/dev%2Fvdb/volume?vm_id=nope", status: 400, code: commands.CodeInvalidRequest, field: "vm_id"},
		{name: "device outside /dev", method: "GET", path: "/devices/%2Fetc%2Fpasswd/volume", status: 400, code: commands.CodeInvalidRequest, field: "device_path"},
		{name: "device climbing out of /dev", method: "GET", path: "/devices/dev%2F..%2Fetc%2Fpasswd/volume", status: 400, code: commands.CodeInvalidRequest, field: "device_path"},
		{name: "device bare name", method: "GET", path: "/devices/vdb/volume", status: 400, code: commands.CodeInvalidRequest, field: "device_path"},
		{name: "device unencoded slashes are no route", method: "GET", path: "/devices/dev/vdb/volume", status: 404, code: commands.CodeNotFound},
		{name: "vm volumes", method: "GET", path: "/vms/vm-" + vm1 + "/volumes", status: 200, check: func(t *testing.T, body []byte) {
			vols := decodeAs[[]commands.VolumeStatus](t, body)
			if len(vols) != 1 || vols[0].VolumeID != vol1 || vols[0].CloudStackData != nil {
				t.Errorf("volumes %s", body)
			}
		}},
		{name: "vm without volumes is []", method: "GET", path: "/vms/" + vmEmpty + "/volumes", status: 200, check: func(t *testing.T, body []byte) {
			if string(bytes.TrimSpace(body)) != "[]" {
				t.Errorf("body %s, want []", body)
			}
		}},
		{name: "vm malformed id", method: "GET", path: "/vms/vol-" + vm1 + "/volumes", status: 400, code: commands.CodeInvalidRequest, field: "vm_id"},
		{name: "openapi document", method: "GET", path: "/openapi.json", status: 200, check: func(t *testing.T, body []byte) {
			if !bytes.Equal(body, httpbridge.OpenAPI()) {
				t.Error("served document differs from the embedded one")
			}
		}},
	})
}

func TestMonitoring(t *testing.T) {
	h := newHarness(t, options{})
	for _, tc := range []struct {
		health string
		status int
	}{
		{commands.Healthy, 200}, {commands.Degraded, 200}, {commands.Unhealthy, 503},
	} {
		t.Run("health "+tc.health, func(t *testing.T) {
			h.backend.setHealth(tc.health)
			resp, body := h.do(t, "GET", "/health", "")
			if got := decodeAs[commands.Health](t, body); resp.StatusCode != tc.status || got.Status != tc.health {
				t.Errorf("health %s: %d %s", tc.health, resp.StatusCode, body)
			}
		})
	}
	t.Run("metrics", func(t *testing.T) {
		resp, body := h.do(t, "GET", "/metrics", "")
		raw := decodeAs[map[string]any](t, body)
		if resp.StatusCode != 200 || raw["total_operations"] != float64(3) || raw["operations_by_type"] == nil {
			t.Errorf("metrics: %d %s", resp.StatusCode, body)
		}
	})
	t.Run("metrics unavailable", func(t *testing.T) {
		h.backend.setMetricsErr(commands.Unavailable("CloudStack unreachable"))
		defer h.backend.setMetricsErr(nil)
		resp, body := h.do(t, "GET", "/metrics", "")
		if e := decodeAs[apiErr](t, body); resp.StatusCode != 503 || e.Code != commands.CodeServiceUnavailable {
			t.Errorf("metrics: %d %s", resp.StatusCode, body)
		}
	})
}

func TestRouting(t *testing.T) {
	h := newHarness(t, options{})
	for _, tc := range []struct {
		method, url string
		status      int
		allow       string
	}{
		{"GET", h.base + "/nope", 404, ""},
		{"GET", "http://" + h.srv.Addr() + "/", 404, ""},
		{"GET", "http://" + h.srv.Addr() + "/api/v2/health", 404, ""},
		{"PUT", h.base + "/volumes", 405, "GET, POST"},
		{"PATCH", h.base + "/volumes/" + vol1 + "/tags", 405, "PUT"},
		{"PATCH", h.base + "/volumes/" + vol1, 405, "GET, DELETE"},
		{"POST", h.base + "/health", 405, "GET"},
		{"GET", h.base + "/admin/force-sync", 405, "POST"},
	} {
		t.Run(tc.method+" "+strings.TrimPrefix(tc.url, "http://"+h.srv.Addr()), func(t *testing.T) {
			resp, body := validator.Do(t, nil, apitest.NewRequest(t, tc.method, tc.url, ""))
			if resp.StatusCode != tc.status || resp.Header.Get("Allow") != tc.allow {
				t.Errorf("%d Allow=%q %s, want %d Allow=%q", resp.StatusCode, resp.Header.Get("Allow"), body, tc.status, tc.allow)
			}
		})
	}
}

func TestExports(t *testing.T) {
	h := newHarness(t, options{})
	at := time.Date(2025, 8, 19, 20, 31, 16, 0, time.UTC)
	exp := commands.Export{VolumeID: vol1, VMID: vm1, ExportName: "vol3f2b7c1e", DevicePath: "/dev/disk/by-volume/vol3f2b7c1e",
		ReadOnly: true, Status: commands.ExportActive, Clients: 2, CreatedAt: at, UpdatedAt: at}
	exportOf := func(volumeID string, clients int) func(*testing.T, []byte) {
		return func(t *testing.T, body []byte) {
			if e := decodeAs[commands.Export](t, body); e.VolumeID != volumeID || e.Clients != clients {
				t.Errorf("export %s, want volume %s with %d clients", body, volumeID, clients)
			}
		}
	}
	t.Run("none", func(t *testing.T) {
		runCases(t, h, []endpointCase{
			{name: "list is []", method: "GET", path: "/exports", status: 200, check: func(t *testing.T, body []byte) {
				if string(bytes.TrimSpace(body)) != "[]" {
					t.Errorf("body %s, want []", body)
				}
			}},
			{name: "not exported", method: "GET", path: "/exports/" + vol2, status: 404, code: commands.CodeNotFound},
		})
	})
	h.backend.setExports([]commands.Export{exp}, nil)
	runCases(t, h, []endpointCase{
		{name: "list", method: "GET", path: "/exports", status: 200, check: func(t *testing.T, body []byte) {
			if got := decodeAs[[]commands.Export](t, body); len(got) != 1 || got[0] != exp {
				t.Errorf("exports %s, want [%+v]", body, exp)
			}
		}},
		{name: "get vol- prefixed", method: "GET", path: "/exports/vol-" + vol1, status: 200, check: exportOf(vol1, 2)},
		{name: "get malformed id", method: "GET", path: "/exports/vm-" + vol1, status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "export read-only by default", method: "POST", path: "/exports", body: "export.json", status: 201,
			check: accepted(commands.OpExport, vol1, vm1, map[string]any{"volume_id": vol1, "read_only": true})},
		{name: "export read-write", method: "POST", path: "/exports", body: "export_read_write.json", status: 201,
			check: accepted(commands.OpExport, vol1, vm1, map[string]any{"read_only": false})},
		{name: "export read_only not a boolean", method: "POST", path: "/exports", body: "export_read_only_string.json",
			status: 400, code: commands.CodeInvalidRequest, field: "read_only"},
		{name: "export unknown field", method: "POST", path: "/exports", body: "export_unknown_field.json",
			status: 400, code: commands.CodeInvalidRequest, field: "export_name"},
		{name: "export without body", method: "POST", path: "/exports", status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "export malformed JSON", method: "POST", path: "/exports", body: "malformed.json", status: 400, code: commands.CodeInvalidRequest},
		{name: "export of a volume not attached here", method: "POST", path: "/exports", body: "export_detached.json",
			status: 409, code: commands.CodeConflict},
		{name: "export of an unknown volume", method: "POST", path: "/exports", body: "export_unknown.json",
			status: 404, code: commands.CodeNotFound},
		{name: "unexport", method: "DELETE", path: "/exports/vol-" + vol1, status: 201,
			check: accepted(commands.OpUnexport, vol1, "", map[string]any{"volume_id": vol1})},
		{name: "unexport body names another volume", method: "DELETE", path: "/exports/" + vol1, body: "attach_other_volume.json",
			status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "unexport malformed id", method: "DELETE", path: "/exports/nope", status: 400, code: commands.CodeInvalidRequest, field: "volume_id"},
		{name: "unexport unknown volume", method: "DELETE", path: "/exports/" + volUnknown, status: 404, code: commands.CodeNotFound},
	})
	t.Run("nbd server off", func(t *testing.T) {
		h.backend.setExports(nil, commands.Unavailable("the NBD server is off"))
		runCases(t, h, []endpointCase{
			{name: "list", method: "GET", path: "/exports", status: 503, code: commands.CodeServiceUnavailable},
			{name: "get", method: "GET", path: "/exports/" + vol1, status: 503, code: commands.CodeServiceUnavailable},
		})
	})
}
