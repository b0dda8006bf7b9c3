package commands

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestDecodeFailover(t *testing.T) {
	const (
		vm   = "11111111-1111-4111-8111-111111111111"
		root = "22222222-2222-4222-8222-222222222222"
		d1   = "33333333-3333-4333-8333-333333333333"
	)
	many := make([]string, MaxFailoverVolumes)
	for i := range many {
		many[i] = fmt.Sprintf(`"%08d-0000-4000-8000-000000000000"`, i)
	}
	for _, tc := range []struct {
		name, body, field string
		want              FailoverRequest
	}{
		{name: "defaults", body: `{"vm_id":"vm-` + vm + `","root_volume_id":"vol-` + root + `"}`,
			want: FailoverRequest{VMID: vm, RootVolumeID: root, DataVolumeIDs: []string{}, Test: true, StartVM: true}},
		{name: "live without start", body: `{"vm_id":"` + vm + `","root_volume_id":"` + root + `","data_volume_ids":["` + d1 + `"],"test":false,"start_vm":false,"force":true}`,
			want: FailoverRequest{VMID: vm, RootVolumeID: root, DataVolumeIDs: []string{d1}, StartVM: false, Force: true}},
		{name: "no vm", body: `{"root_volume_id":"` + root + `"}`, field: "vm_id"},
		{name: "no root", body: `{"vm_id":"` + vm + `"}`, field: "root_volume_id"},
		{name: "bad data id", body: `{"vm_id":"` + vm + `","root_volume_id":"` + root + `","data_volume_ids":["x"]}`, field: "data_volume_ids"},
		{name: "root among data", body: `{"vm_id":"` + vm + `","root_volume_id":"` + root + `","data_volume_ids":["` + strings.ToUpper(root) + `"]}`, field: "data_volume_ids"},
		{name: "twice", body: `{"vm_id":"` + vm + `","root_volume_id":"` + root + `","data_volume_ids":["` + d1 + `","vol-` + d1 + `"]}`, field: "data_volume_ids"},
		{name: "too many", body: `{"vm_id":"` + vm + `","root_volume_id":"` + root + `","data_volume_ids":[` + strings.Join(many, ",") + `]}`, field: "data_volume_ids"},
		{name: "unknown field", body: `{"vm_id":"` + vm + `","root_volume_id":"` + root + `","bogus":1}`, field: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecodeFailover([]byte(tc.body))
			if tc.want.VMID != "" {
				if err != nil {
					t.Fatal(err)
				}
				if got.VMID != tc.want.VMID || got.RootVolumeID != tc.want.RootVolumeID || !slices.Equal(got.DataVolumeIDs, tc.want.DataVolumeIDs) ||
					got.Test != tc.want.Test || got.StartVM != tc.want.StartVM || got.Force != tc.want.Force {
					t.Fatalf("got %+v, want %+v", got, tc.want)
				}
				return
			}
			var ce *Error
			if !errors.As(err, &ce) || ce.Code != CodeInvalidRequest {
				t.Fatalf("err = %v, want INVALID", err)
			}
			if tc.field != "" && ce.Details["field"] != tc.field {
				t.Fatalf("field = %v, want %s (%v)", ce.Details["field"], tc.field, err)
			}
		})
	}
}

func TestDecodeRollback(t *testing.T) {
	got, err := DecodeRollback([]byte(`{"failover_id":"op-22222222-2222-4222-8222-222222222222"}`))
	if err != nil || got.FailoverID != "op-22222222-2222-4222-8222-222222222222" {
		t.Fatalf("got %+v, %v", got, err)
	}
	if _, err := DecodeRollback([]byte(`{"failover_id":"nope"}`)); err == nil {
		t.Fatal("a bad id was taken")
	}
}
