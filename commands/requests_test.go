package commands_test

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
)

const (
	zone     = "057e86db-c726-4d8c-ab1f-75c5f55d1881"
	offering = "c813c642-d946-49e1-9289-c616dd70206a"
	vol      = "12345678-1234-1234-1234-123456789012"
	vm       = "87654321-4321-4321-4321-210987654321"
)

func TestDecodeCreate(t *testing.T) {
	tests := []struct {
		name, body, field string
		ok                bool
		gib               int64
	}{
		{"reference example", `{"name":"migration-volume-001","size":5368709120,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `","metadata":{"purpose":"vm_migration"}}`, "", true, 5},
		{"rounds up to whole GiB", `{"name":"n","size":1073741825,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "", true, 2},
		{"upper-case ids", `{"name":"n","size":1073741824,"disk_offering_id":"` + strings.ToUpper(offering) + `","zone_id":"` + zone + `"}`, "", true, 1},
		{"below 1 GiB", `{"name":"n","size":536870912,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"size missing", `{"name":"n","disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"largest size", `{"name":"n","size":70368744177664,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "", true, 65536},
		{"size above 64 TiB", `{"name":"n","size":70368744177665,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"size that overflows on rounding up", `{"name":"n","size":9223372036854775807,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"size beyond int64", `{"name":"n","size":9223372036854775808,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"size in exponent form", `{"name":"n","size":1e30,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"size negative", `{"name":"n","size":-9223372036854775808,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"size fractional", `{"name":"n","size":1.5e9,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "size", false, 0},
		{"name blank", `{"name":"  ","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "name", false, 0},
		{"name with newline", `{"name":"a\nb","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "name", false, 0},
		{"name too long", `{"name":"` + strings.Repeat("n", 256) + `","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "name", false, 0},
		{"bad zone", `{"name":"n","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"invalid-zone"}`, "zone_id", false, 0},
		{"offering missing", `{"name":"n","size":1073741824,"zone_id":"` + zone + `"}`, "disk_offering_id", false, 0},
		{"unknown field", `{"name":"n","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `","sz":1}`, "sz", false, 0},
		{"long unknown field cut", `{"name":"n","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `","` + strings.Repeat("z", 5000) + `":1}`, strings.Repeat("z", 40) + "…", false, 0},
		{"metadata not an object", `{"name":"n","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `","metadata":[1]}`, "metadata", false, 0},
		{"array body", `[]`, "", false, 0},
		{"trailing data", `{"name":"n"} x`, "", false, 0},
		{"truncated", `{"name":`, "", false, 0},
		// encoding/json would take it as U+FFFD: the name recorded would not be the one sent.
		{"name not UTF-8", "{\"name\":\"a\xffb\",\"size\":1073741824,\"disk_offering_id\":\"" + offering + "\",\"zone_id\":\"" + zone + "\"}", "", false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, err := commands.DecodeCreate([]byte(tc.body))
			if tc.ok {
				if err != nil {
					t.Fatalf("unexpected error %v", err)
				}
				if req.SizeGiB() != tc.gib || req.ZoneID != zone || req.DiskOfferingID != offering {
					t.Fatalf("decoded %+v (GiB %d)", req, req.SizeGiB())
				}
				return
			}
			var e *commands.Error
			if !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Code != commands.CodeInvalidRequest {
				t.Fatalf("error %v, want 400 INVALID_REQUEST", err)
			}
			if tc.field != "" && e.Details["field"] != tc.field {
				t.Fatalf("details %v, want field %q", e.Details, tc.field)
			}
		})
	}
}

func TestDecodeAttach(t *testing.T) {
	tests := []struct {
		name, body string
		root, ok   bool
	}{
		{"bare ids", `{"volume_id":"` + vol + `","vm_id":"` + vm + `"}`, false, true},
		{"reference prefixes", `{"volume_id":"vol-` + vol + `","vm_id":"vm-` + vm + `"}`, false, true},
		{"root", `{"volume_id":"` + vol + `","vm_id":"` + vm + `"}`, true, true},
		{"vm missing", `{"volume_id":"` + vol + `"}`, false, false},
		{"device_id not accepted", `{"volume_id":"` + vol + `","vm_id":"` + vm + `","device_id":2}`, false, false},
		{"wrong prefix", `{"volume_id":"vm-` + vol + `","vm_id":"` + vm + `"}`, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, err := commands.DecodeAttach([]byte(tc.body), tc.root)
			if (err == nil) != tc.ok {
				t.Fatalf("error %v, want ok=%v", err, tc.ok)
			}
			if !tc.ok {
				return
			}
			if req.VolumeID != vol || req.VMID != vm || req.Root() != tc.root {
				t.Fatalf("decoded %+v", req)
			}
			if tc.root && (req.DeviceID == nil || *req.DeviceID != 0 || req.AttachAs != "root") {
				t.Fatalf("root attach without device 0: %+v", req)
			}
			if !tc.root && req.DeviceID != nil {
				t.Fatalf("plain attach with a device id: %+v", req)
			}
		})
	}
}

func TestDecodeVolumeAndOperationIDs(t *testing.T) {
	if r, err := commands.DecodeVolume(nil); err == nil {
		t.Fatalf("empty body decoded as %+v", r)
	}
	if r, err := commands.DecodeVolume([]byte(`{"volume_id":"vol-` + vol + `"}`)); err != nil || r.VolumeID != vol {
		t.Fatalf("decode volume: %+v %v", r, err)
	}
	if id, err := commands.NormalizeOperationID("op-" + strings.ToUpper(vol)); err != nil || id != "op-"+vol {
		t.Fatalf("operation id: %q %v", id, err)
	}
	if _, err := commands.NormalizeOperationID("banana"); err == nil {
		t.Fatal("malformed operation id accepted")
	}
	big := make([]byte, commands.MaxBodyBytes+1)
	if _, err := commands.DecodeVolume(big); err == nil {
		t.Fatal("oversized body accepted")
	}
}

func TestOperationHelpers(t *testing.T) {
	for _, s := range commands.OpStatuses {
		want := s == commands.StatusCompleted || s == commands.StatusFailed || s == commands.StatusCancelled
		if s.Terminal() != want {
			t.Errorf("%s.Terminal() = %v", s, !want)
		}
	}
	if got := commands.AsError(errors.New("boom")); got.Status != http.StatusInternalServerError || got.Code != commands.CodeInternalError {
		t.Errorf("AsError of a plain error: %+v", got)
	}
	if got := commands.DeviceSubject(vm, commands.DeviceAdd); got != "devices."+vm+".add" {
		t.Errorf("DeviceSubject = %s", got)
	}
}

func TestDecodeExport(t *testing.T) {
	tests := []struct {
		name, body, field string
		ok, readOnly      bool
	}{
		{"read-only by default", `{"volume_id":"` + vol + `"}`, "", true, true},
		{"read-write asked", `{"volume_id":"vol-` + vol + `","read_only":false}`, "", true, false},
		{"read-only asked", `{"volume_id":"` + strings.ToUpper(vol) + `","read_only":true}`, "", true, true},
		{"volume missing", `{"read_only":true}`, "volume_id", false, false},
		{"read_only not a boolean", `{"volume_id":"` + vol + `","read_only":"no"}`, "read_only", false, false},
		{"unknown field", `{"volume_id":"` + vol + `","name":"x"}`, "name", false, false},
		{"empty body", ``, "volume_id", false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, err := commands.DecodeExport([]byte(tc.body))
			if !tc.ok {
				var e *commands.Error
				if !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Details["field"] != tc.field {
					t.Fatalf("error %v (%+v), want 400 on field %q", err, e, tc.field)
				}
				return
			}
			if err != nil || req.VolumeID != vol || req.ReadOnly != tc.readOnly {
				t.Fatalf("decoded %+v, %v; want %s read_only=%v", req, err, vol, tc.readOnly)
			}
		})
	}
}

func TestValidateIdempotencyKey(t *testing.T) {
	for _, tc := range []struct {
		key string
		ok  bool
	}{
		{"", true}, {"order-42/attach", true}, {strings.Repeat("k", commands.MaxIdempotencyKeyBytes), true},
		{strings.Repeat("k", commands.MaxIdempotencyKeyBytes+1), false}, {"with space", false}, {"tab\tkey", false}, {"clé", false},
	} {
		err := commands.ValidateIdempotencyKey(tc.key)
		var e *commands.Error
		if tc.ok != (err == nil) || (err != nil && (!errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Details["field"] != commands.IdempotencyKeyHeader)) {
			t.Errorf("key %q: %v, want ok=%v", tc.key, err, tc.ok)
		}
	}
}

// TestDecodeTypeErrors: a field of the wrong JSON type is named, with
// the JSON kind it must be, not Go's.
func TestDecodeTypeErrors(t *testing.T) {
	for _, tc := range []struct {
		name, body, field, want string
		decode                  func([]byte) error
	}{
		{"array", `{"vm_id":"` + vm + `","root_volume_id":"` + vol + `","data_volume_ids":"` + vol + `"}`, "data_volume_ids",
			"data_volume_ids must be an array, got string", func(b []byte) error { _, err := commands.DecodeFailover(b); return err }},
		{"boolean", `{"volume_id":"` + vol + `","force":"yes"}`, "force",
			"force must be a boolean, got string", func(b []byte) error { _, err := commands.DecodeVolume(b); return err }},
		{"integer", `{"name":"n","size":"1"}`, "size",
			"size must be an integer, got string", func(b []byte) error { _, err := commands.DecodeCreate(b); return err }},
		{"tag value", `{"volume_id":"` + vol + `","tags":{"env":"x","k":1}}`, "tags",
			"tags.k must be a string: tags become the volume's CloudStack tags", func(b []byte) error { _, err := commands.DecodeTags(b); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var e *commands.Error
			if err := tc.decode([]byte(tc.body)); !errors.As(err, &e) || e.Details["field"] != tc.field || e.Message != tc.want {
				t.Fatalf("error %v (%+v), want %q on field %q", err, e, tc.want, tc.field)
			}
		})
	}
}

func TestDecodeVolumeForce(t *testing.T) {
	for _, tc := range []struct {
		name, body, field string
		ok, force         bool
	}{
		{"no force by default", `{"volume_id":"` + vol + `"}`, "", true, false},
		{"force asked", `{"volume_id":"` + vol + `","force":true}`, "", true, true},
		{"force false", `{"volume_id":"` + vol + `","force":false}`, "", true, false},
		{"force not a boolean", `{"volume_id":"` + vol + `","force":"yes"}`, "force", false, false},
		{"force a number", `{"volume_id":"` + vol + `","force":1}`, "force", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := commands.DecodeVolume([]byte(tc.body))
			if !tc.ok {
				var e *commands.Error
				if !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Details["field"] != tc.field {
					t.Fatalf("error %v (%+v), want 400 on field %q", err, e, tc.field)
				}
				return
			}
			if err != nil || req.VolumeID != vol || req.Force != tc.force {
				t.Fatalf("decoded %+v, %v; want force=%v", req, err, tc.force)
			}
		})
	}
	if s := commands.DevicesUsersSubject(vm); s != "devices."+vm+".users" {
		t.Errorf("DevicesUsersSubject = %s", s)
	}
}

// TestMetadataTags: metadata becomes tags; what an earlier volumed
// accepted and CloudStack cannot take is left out.
func TestMetadataTags(t *testing.T) {
	got := commands.MetadataTags(map[string]any{"purpose": "test", "n": 1.5, "obj": map[string]any{"a": true}, "empty": "",
		"": "no key", "long": strings.Repeat("x", 256)})
	want := map[string]string{"purpose": "test", "n": "1.5", "obj": `{"a":true}`}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("MetadataTags = %v, want %v", got, want)
	}
}

// TestDecodeNamesExactly: encoding/json matches names without case; a
// field named only without case (or with a Unicode fold) is an unknown
// field, so a body's id cannot stand beside the path's under another case.
func TestDecodeNamesExactly(t *testing.T) {
	for _, tc := range []struct {
		name, body, field string
		decode            func([]byte) error
	}{
		{"upper-case create", `{"NAME":"n","size":1073741824,"disk_offering_id":"` + offering + `","zone_id":"` + zone + `"}`, "NAME",
			func(b []byte) error { _, err := commands.DecodeCreate(b); return err }},
		{"id beside the path's", `{"volume_id":"` + vol + `","VOLUME_ID":"` + vm + `"}`, "VOLUME_ID",
			func(b []byte) error { _, err := commands.DecodeSnapshot(b); return err }},
		{"Kelvin sign folds to k", `{"volume_id":"` + vol + `","size":1073741824,"shrin\u212a_ok":true}`, "shrin\u212a_ok",
			func(b []byte) error { _, err := commands.DecodeResize(b); return err }},
		{"long s folds to s", `{"volume_id":"` + vol + `","ſize":1073741824}`, "ſize",
			func(b []byte) error { _, err := commands.DecodeResize(b); return err }},
		{"force-sync", `{"X":1}`, "X", commands.DecodeForceSync},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var e *commands.Error
			if err := tc.decode([]byte(tc.body)); !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Details["field"] != tc.field {
				t.Fatalf("error %v (%+v), want 400 on unknown field %q", err, e, tc.field)
			}
		})
	}
	if _, err := commands.DecodeSnapshot([]byte(`null`)); err == nil || !strings.Contains(err.Error(), "volume_id is required") {
		t.Fatalf("null body: %v, want volume_id required", err)
	}
}
