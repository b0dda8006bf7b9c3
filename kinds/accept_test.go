package kinds_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csfake"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/kinds"
)

// listed is a Catalog over fixed lists.
type listed map[kinds.List][]string

func (l listed) Unlisted(_ context.Context, list kinds.List, id string) bool {
	for _, known := range l[list] {
		if known == id {
			return false
		}
	}
	return true
}

// TestPrechecks: each kind decodes its commands and checks them before
// they are recorded, answering as CloudStack would; a CloudStack that
// cannot be reached leaves the command unchecked.
func TestPrechecks(t *testing.T) {
	const unknown = "00000000-0000-4000-8000-000000000001"
	body := func(v any) []byte { b, _ := json.Marshal(v); return b }
	for _, tc := range []struct {
		name    string
		subject string
		body    func(vol string) []byte
		fault   *csfake.Fault // on listVolumes
		status  int           // 0: accepted
	}{
		{"create", commands.SubjectCreate, func(string) []byte {
			return body(commands.CreateRequest{Name: "n", Size: 1 << 30, DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
		}, nil, 0},
		{"create in an unknown zone", commands.SubjectCreate, func(string) []byte {
			return body(commands.CreateRequest{Name: "n", Size: 1 << 30, DiskOfferingID: csfake.CustomOfferingID, ZoneID: unknown})
		}, nil, http.StatusUnprocessableEntity},
		{"create with a bad size", commands.SubjectCreate, func(string) []byte {
			return body(map[string]any{"name": "n", "size": -1, "disk_offering_id": csfake.CustomOfferingID, "zone_id": csfake.ZoneID})
		}, nil, http.StatusBadRequest},
		{"attach", commands.SubjectAttach, func(vol string) []byte {
			return body(commands.AttachRequest{VolumeID: vol, VMID: csfake.VMID})
		}, nil, 0},
		{"attach to an unknown VM", commands.SubjectAttach, func(vol string) []byte {
			return body(commands.AttachRequest{VolumeID: vol, VMID: unknown})
		}, nil, http.StatusNotFound},
		{"attach-root", commands.SubjectAttachRoot, func(vol string) []byte {
			return body(commands.AttachRequest{VolumeID: vol, VMID: csfake.StoppedVMID})
		}, nil, 0},
		{"detach of an unknown volume", commands.SubjectDetach, func(string) []byte {
			return body(commands.VolumeRequest{VolumeID: unknown})
		}, nil, http.StatusNotFound},
		{"delete, CloudStack unreachable: accepted unchecked", commands.SubjectDelete, func(string) []byte {
			return body(commands.VolumeRequest{VolumeID: unknown})
		}, &csfake.Fault{Err: csfake.Unreachable(csfake.CmdListVolumes)}, 0},
		{"delete, malformed id", commands.SubjectDelete, func(string) []byte {
			return body(commands.VolumeRequest{VolumeID: "x"})
		}, nil, http.StatusBadRequest},
		{"unexport without an NBD server", commands.SubjectUnexport, func(vol string) []byte {
			return body(commands.VolumeRequest{VolumeID: vol})
		}, nil, http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			vol := w.volume("p", "")
			if tc.fault != nil {
				w.cloud.Script(csfake.CmdListVolumes, *tc.fault)
			}
			var acc engine.Accepter
			for _, k := range w.engine.Kinds() {
				a, ok := k.(engine.Accepter)
				if !ok {
					continue // the VM power steps take no command
				}
				for _, e := range a.Endpoints() {
					if e.Subject == tc.subject {
						acc = a
					}
				}
			}
			ctx := context.Background()
			cmd, err := acc.Decode(ctx, tc.subject, tc.body(vol))
			if err == nil && cmd.Check != nil {
				err = cmd.Check(ctx, ctx)
			}
			var ce *commands.Error
			switch {
			case tc.status == 0 && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.status != 0 && (!errors.As(err, &ce) || ce.Status != tc.status):
				t.Fatalf("answer %v, want status %d", err, tc.status)
			}
		})
	}
}
