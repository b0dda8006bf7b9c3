package e2e_test

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestClientRoundTrip drives the whole REST surface through the Go
// client against the real daemon, and replays an operation's events over
// NATS with Watch.
func TestClientRoundTrip(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := d.cli()

	vol := d.createVolume("client-vol", 2)
	st, err := c.GetVolume(ctx, vol)
	if err != nil || st.VolumeID != vol || st.Size != 2<<30 || st.LastOperation == nil || st.LastOperation.Type != commands.OpCreate {
		t.Fatalf("GetVolume: %+v %v", st, err)
	}

	op, err := c.AttachVolume(ctx, vol, cloudsim.RemoteVMID)
	if err != nil || op.Type != commands.OpAttach || op.Status != commands.StatusPending {
		t.Fatalf("AttachVolume: %+v %v", op, err)
	}
	done, err := c.Wait(ctx, op.ID)
	if err != nil || done.Status != commands.StatusCompleted || done.Response == nil || done.Response.DeviceID == nil {
		t.Fatalf("Wait: %+v %v", done, err)
	}
	m, err := c.VolumeDevice(ctx, vol)
	if err != nil || m.VolumeID != vol || m.VMID != cloudsim.RemoteVMID {
		t.Fatalf("VolumeDevice: %+v %v", m, err)
	}
	list, err := c.VMVolumes(ctx, cloudsim.RemoteVMID)
	if err != nil || !containsVolume(list, vol) {
		t.Fatalf("VMVolumes: %+v %v", list, err)
	}

	// Watch replays the finished attach from the stream, in order, and ends.
	nc := d.nats()
	wc, err := client.New(d.api, client.WithNATS(nc))
	if err != nil {
		t.Fatal(err)
	}
	var statuses []commands.OpStatus
	for ev, err := range wc.Watch(ctx, op.ID) {
		if err != nil {
			t.Fatalf("Watch: %v", err)
		}
		if ev.ID != op.ID {
			t.Fatalf("Watch yielded another operation: %+v", ev)
		}
		statuses = append(statuses, ev.Status)
	}
	if len(statuses) < 2 || statuses[0] != commands.StatusPending || statuses[len(statuses)-1] != commands.StatusCompleted {
		t.Fatalf("Watch statuses %v: want pending first, completed last", statuses)
	}
	// An unknown operation is NOT_FOUND, at once.
	for _, err := range wc.Watch(ctx, "op-00000000-0000-4000-8000-00000000dead") {
		if !client.HasCode(err, commands.CodeNotFound) {
			t.Fatalf("Watch of an unknown operation: %v", err)
		}
	}
	// Events the stream no longer keeps: the stored record, once (the
	// purge needs volumed's own credentials).
	js, err := jetstream.New(d.natsAs(bus.RoleDaemon))
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(ctx, bus.StreamOps)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject(commands.OpSubject(op.ID))); err != nil {
		t.Fatal(err)
	}
	var after []commands.Operation
	for ev, err := range wc.Watch(ctx, op.ID) {
		if err != nil {
			t.Fatalf("Watch after a purge: %v", err)
		}
		after = append(after, ev)
	}
	if len(after) != 1 || after[0].Status != commands.StatusCompleted || after[0].ID != op.ID {
		t.Fatalf("Watch after a purge yielded %+v, want the completed record once", after)
	}
	// Watch without NATS says so.
	for _, err := range c.Watch(ctx, op.ID) {
		if !errors.Is(err, client.ErrNoNATS) {
			t.Fatalf("Watch without NATS: %v", err)
		}
	}

	if _, err := c.Wait(ctx, mustOp(t)(c.DetachVolume(ctx, vol)).ID); err != nil {
		t.Fatal(err)
	}
	del, err := c.Wait(ctx, mustOp(t)(c.DeleteVolume(ctx, vol)).ID)
	if err != nil || del.Status != commands.StatusCompleted {
		t.Fatalf("delete: %+v %v", del, err)
	}
	page, err := c.ListOperations(ctx, client.ListOptions{VolumeID: vol})
	if err != nil {
		t.Fatal(err)
	}
	var types []commands.OpType
	for _, o := range page.Operations {
		types = append(types, o.Type)
	}
	if !slices.Equal(types, []commands.OpType{commands.OpDelete, commands.OpDetach, commands.OpAttach, commands.OpCreate}) {
		t.Fatalf("ListOperations of the volume: %v", types)
	}
	page, err = c.ListOperations(ctx, client.ListOptions{VolumeID: vol, Type: commands.OpAttach, Limit: 1})
	if err != nil || len(page.Operations) != 1 || page.Operations[0].ID != op.ID || page.NextCursor != "" {
		t.Fatalf("ListOperations filtered: %+v %v", page, err)
	}
	// Pages of one, by cursor, and Operations walking them: the same four.
	page, err = c.ListOperations(ctx, client.ListOptions{VolumeID: vol, Limit: 1})
	if err != nil || len(page.Operations) != 1 || page.Operations[0].Type != commands.OpDelete || page.NextCursor == "" {
		t.Fatalf("first page of one: %+v %v", page, err)
	}
	next, err := c.ListOperations(ctx, client.ListOptions{VolumeID: vol, Limit: 1, Cursor: page.NextCursor})
	if err != nil || len(next.Operations) != 1 || next.Operations[0].Type != commands.OpDetach {
		t.Fatalf("second page of one: %+v %v", next, err)
	}
	var walked []commands.OpType
	for o, err := range c.Operations(ctx, client.ListOptions{VolumeID: vol, Limit: 1}) {
		if err != nil {
			t.Fatal(err)
		}
		walked = append(walked, o.Type)
	}
	if !slices.Equal(walked, types) {
		t.Fatalf("Operations walked %v, want %v", walked, types)
	}

	if h, err := c.Health(ctx); err != nil || h.Status != commands.Healthy {
		t.Fatalf("Health: %+v %v", h, err)
	}
	if mt, err := c.Metrics(ctx); err != nil || mt.OperationsByType["attach"] != 1 || mt.OperationsByStatus["completed"] != 4 {
		t.Fatalf("Metrics: %+v %v", mt, err)
	}
	if r, err := c.ForceSync(ctx); err != nil || r.Message == "" {
		t.Fatalf("ForceSync: %+v %v", r, err)
	}
	if ex, err := c.Exports(ctx); err != nil || len(ex) != 0 {
		t.Fatalf("Exports: %+v %v", ex, err)
	}
	if doc, err := c.OpenAPI(ctx); err != nil || len(doc) < 1000 {
		t.Fatalf("OpenAPI: %d bytes, %v", len(doc), err)
	}
}

// TestClientErrors checks that every kind of refusal comes back as a
// *client.Error with the status, code and details the server sent.
func TestClientErrors(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := d.cli()
	const unknown = "00000000-0000-4000-8000-00000000dead"
	tests := []struct {
		name   string
		call   func() error
		status int
		code   string
		detail string // a details key the error must carry
	}{
		{"unknown volume", func() error { _, err := c.GetVolume(ctx, unknown); return err }, http.StatusNotFound, commands.CodeNotFound, ""},
		{"unknown operation", func() error { _, err := c.GetOperation(ctx, "op-"+unknown); return err }, http.StatusNotFound, commands.CodeNotFound, "operation_id"},
		{"bad size", func() error {
			_, err := c.CreateVolume(ctx, commands.CreateRequest{Name: "n", Size: 1 << 20, ZoneID: cloudsim.ZoneID, DiskOfferingID: cloudsim.CustomOfferingID})
			return err
		}, http.StatusBadRequest, commands.CodeInvalidRequest, "minimum_value"},
		{"bad vm id", func() error { _, err := c.AttachVolume(ctx, unknown, "not-a-uuid"); return err }, http.StatusBadRequest, commands.CodeInvalidRequest, "field"},
		{"bad filter", func() error { _, err := c.ListOperations(ctx, client.ListOptions{Status: "sleeping"}); return err }, http.StatusBadRequest, commands.CodeInvalidRequest, "allowed_values"},
		{"no mapping", func() error { _, err := c.VolumeDevice(ctx, unknown); return err }, http.StatusNotFound, commands.CodeNotFound, "volume_id"},
		{"no device", func() error { _, err := c.DeviceVolume(ctx, "/dev/vdz", ""); return err }, http.StatusNotFound, commands.CodeNotFound, "device_path"},
		{"wait on unknown", func() error { _, err := c.Wait(ctx, "op-"+unknown); return err }, http.StatusNotFound, commands.CodeNotFound, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			var e *client.Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v (%T), want *client.Error", err, err)
			}
			if e.Status != tc.status || e.Code() != tc.code || !client.HasCode(err, tc.code) {
				t.Fatalf("error %+v, want %d %s", e, tc.status, tc.code)
			}
			if _, ok := e.Details()[tc.detail]; tc.detail != "" && !ok {
				t.Fatalf("details %v lack %q", e.Details(), tc.detail)
			}
			var api *commands.Error
			if !errors.As(err, &api) || api.Code != tc.code || api.Message == "" {
				t.Fatalf("errors.As *commands.Error: %+v", api)
			}
		})
	}
	// A server that is not there is a transport error, not an *Error.
	gone, _ := client.New("http://127.0.0.1:1")
	if _, err := gone.Health(ctx); err == nil || errors.As(err, new(*client.Error)) {
		t.Fatalf("unreachable server: %v", err)
	}
}

// mustOp returns an accepted operation or fails the test.
func mustOp(t *testing.T) func(commands.Operation, error) commands.Operation {
	return func(op commands.Operation, err error) commands.Operation {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return op
	}
}
