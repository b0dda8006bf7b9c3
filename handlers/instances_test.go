package handlers_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// olderInstance announces the command service as an instance of an
// earlier release does: named volumed, its version, an endpoint on each
// of subjects (which never answers), on a connection of its own.
type olderInstance struct {
	nc  *nats.Conn
	svc micro.Service
}

func startOlderInstance(t *testing.T, h *harness, version string, subjects ...string) *olderInstance {
	t.Helper()
	nc := testenv.Connect(t, h.bus, bus.RoleDaemon, nats.Name("volumed-"+version))
	svc, err := micro.AddService(nc, micro.Config{Name: commands.ServiceName, Version: version, QueueGroup: "older"})
	if err != nil {
		t.Fatal(err)
	}
	for _, subject := range subjects {
		name := strings.ReplaceAll(subject, ".", "-")
		if err := svc.AddEndpoint(name, micro.HandlerFunc(func(micro.Request) {}), micro.WithEndpointSubject(subject)); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil { // subscribed before anyone asks
		t.Fatal(err)
	}
	o := &olderInstance{nc: nc, svc: svc}
	t.Cleanup(o.stop)
	return o
}

// stop ends the instance's service, unsubscribed before it returns.
func (o *olderInstance) stop() {
	_ = o.svc.Stop()
	_ = o.nc.Flush()
}

// TestSeveralVolumesNeedEveryInstance: a command on several volumes is
// refused 503, in the documented format, naming the instance and its
// version, and records nothing, while a running instance does not serve
// its subject (an earlier release, which would fail its job or a hold as
// of an unknown type); once every instance serves it, it is accepted. The
// subject decides, not the kind: an instance that serves failovers but
// not rollbacks refuses a rollback.
func TestSeveralVolumesNeedEveryInstance(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	ctx := context.Background()
	failover := map[string]any{"vm_id": cloudsim.TestVMID, "root_volume_id": h.createVolume("fo-root"),
		"data_volume_ids": []string{h.createVolume("fo-data")}}

	refused := func(t *testing.T, a answer, o *olderInstance, subject string) {
		t.Helper()
		info := o.svc.Info()
		if a.status != http.StatusServiceUnavailable || a.err.Code != commands.CodeServiceUnavailable ||
			a.header.Get(commands.RetryAfterHeader) != "1" {
			t.Fatalf("%s: %d %s (Retry-After %q), want 503 SERVICE_UNAVAILABLE with Retry-After 1",
				subject, a.status, a.body, a.header.Get(commands.RetryAfterHeader))
		}
		for _, want := range []string{info.ID, "version " + info.Version, subject, "upgrade every instance first"} {
			if !strings.Contains(a.err.Message, want) {
				t.Errorf("%s: message %q does not say %q", subject, a.err.Message, want)
			}
		}
		if got, _ := a.err.Details["instances"].([]any); len(got) != 1 || a.err.Details["subject"] != subject {
			t.Errorf("%s: details %v, want the one instance and the subject", subject, a.err.Details)
		}
	}

	older := startOlderInstance(t, h, "0.9.0", commands.SubjectCreate, commands.SubjectAttach)
	refused(t, h.local(ctx, commands.SubjectFailover, failover, "fo-refused"), older, commands.SubjectFailover)
	a := h.command(commands.SubjectFailover, failover, "fo-refused")
	refused(t, a, older, commands.SubjectFailover)
	if a.header.Get(micro.ErrorCodeHeader) != "503" {
		t.Errorf("NATS answer's %s header %q, want 503", micro.ErrorCodeHeader, a.header.Get(micro.ErrorCodeHeader))
	}
	if ops := h.operations(); len(ops) != 0 || h.recorded(handlers.OperationIDForKey("fo-refused")) {
		t.Fatalf("%d operations recorded after the refusals, want none", len(ops))
	}

	older.stop()
	fo := h.local(ctx, commands.SubjectFailover, failover, "fo-accepted")
	if fo.status != http.StatusCreated || fo.op.Type != commands.OpFailover {
		t.Fatalf("failover with every instance serving it: %d %s, want 201", fo.status, fo.body)
	}

	partial := startOlderInstance(t, h, "0.9.5", commands.SubjectCreate, commands.SubjectFailover)
	refused(t, h.local(ctx, commands.SubjectRollback, map[string]any{"failover_id": fo.op.ID}, ""), partial, commands.SubjectRollback)
	for _, op := range h.operations() {
		if op.Type == commands.OpRollback {
			t.Errorf("rollback %s recorded after the refusal", op.ID)
		}
	}
}
