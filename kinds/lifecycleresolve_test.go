package kinds_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
)

// fakeLook answers a Resolver's questions from the CloudStack fake; no
// later operation.
type fakeLook struct {
	w   *life
	vol string
}

func (l fakeLook) Volume(ctx context.Context) (csapi.Volume, bool, error) {
	v, err := l.w.cloud.GetVolume(ctx, l.vol)
	if errors.Is(err, csapi.ErrNotFound) {
		return v, true, nil
	}
	return v, false, err
}

func (fakeLook) Later(context.Context) (string, error) { return "", nil }

// TestLifecycleJobsGone: a job CloudStack forgot after its operation timed
// out is resolved from what CloudStack shows: the snapshot by its name, a
// deleted snapshot by its absence, a resize by the size, tags by the exact
// set; a revert stays unknown, and so does a job whose effect is not seen.
func TestLifecycleJobsGone(t *testing.T) {
	w := newLife(t, false)
	vol := w.readyVolume("")
	snapOp := "op-7f1c2e3d-0000-4000-8000-000000000001"
	w.snapshotOf(vol, commands.SnapshotName(snapOp, ""))
	gone := w.snapshotOf(vol, "gone")
	w.wait(w.cloud.DeleteSnapshot(w.ctx, gone))
	kept := w.snapshotOf(vol, "kept")
	w.wait(w.cloud.ResizeVolume(w.ctx, vol, 2, false))
	w.wait(w.cloud.CreateTags(w.ctx, vol, map[string]string{"env": "prod"}))
	for _, tc := range []struct {
		name string
		typ  commands.OpType
		id   string
		req  any
		want string
	}{
		{"snapshot taken", commands.OpSnapshot, snapOp, commands.SnapshotRequest{VolumeID: vol}, commands.JobSucceeded},
		{"snapshot not taken", commands.OpSnapshot, "op-7f1c2e3d-0000-4000-8000-000000000002", commands.SnapshotRequest{VolumeID: vol}, commands.JobUnknown},
		{"snapshot deleted", commands.OpDeleteSnapshot, "", commands.SnapshotIDRequest{SnapshotID: gone}, commands.JobSucceeded},
		{"snapshot still there", commands.OpDeleteSnapshot, "", commands.SnapshotIDRequest{SnapshotID: kept}, commands.JobUnknown},
		{"resized", commands.OpResize, "", commands.ResizeRequest{VolumeID: vol, Size: 2 << 30}, commands.JobSucceeded},
		{"not resized", commands.OpResize, "", commands.ResizeRequest{VolumeID: vol, Size: 5 << 30}, commands.JobUnknown},
		{"tags exact", commands.OpTags, "", commands.TagsRequest{VolumeID: vol, Tags: map[string]string{"env": "prod"}}, commands.JobSucceeded},
		{"tags differ", commands.OpTags, "", commands.TagsRequest{VolumeID: vol, Tags: map[string]string{}}, commands.JobUnknown},
		{"revert", commands.OpRevert, "", commands.RevertRequest{VolumeID: vol, SnapshotID: kept}, commands.JobUnknown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw, _ := json.Marshal(tc.req)
			op := commands.Operation{ID: tc.id, Type: tc.typ, VolumeID: vol, Request: raw}
			r, ok := w.engine.Kind(tc.typ).(engine.Resolver)
			if !ok {
				t.Fatalf("kind %s is no Resolver", tc.typ)
			}
			out, err := r.Gone(w.ctx, op, "job-1", fakeLook{w, vol})
			if err != nil || out.Status != tc.want || out.Resolution == "" {
				t.Fatalf("Gone = %+v, %v; want %s", out, err, tc.want)
			}
		})
	}
}
