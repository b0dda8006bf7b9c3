package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// Ids of the failover tests.
const (
	foVM    = "87654321-4321-4321-4321-210987654321"
	foRoot  = "3f2b7c1e-8a4d-4e6f-9b0a-1c2d3e4f5a6b"
	foData  = "7d9e1f20-3b4c-4d5e-8f6a-7b8c9d0e1f2a"
	foSnap  = "5a5a5a5a-1b1b-4c2c-8d3d-4e4e4e4e4e4e"
	foOpBad = "nope"
)

// sentCommand is a command the bridge handed to the command service.
type sentCommand struct{ subject, body, key string }

// recordingCommands is the bridge's command service in these tests: it
// records each command and accepts it as a pending operation in the
// store, of the type its subject names.
type recordingCommands struct {
	store state.Store
	mu    sync.Mutex
	sent  []sentCommand
}

var _ httpbridge.Commands = (*recordingCommands)(nil)

func (c *recordingCommands) Command(ctx context.Context, subject string, data []byte, key string) commands.Answer {
	c.mu.Lock()
	c.sent = append(c.sent, sentCommand{subject, string(data), key})
	c.mu.Unlock()
	typ := map[string]commands.OpType{commands.SubjectFailover: commands.OpFailover, commands.SubjectRollback: commands.OpRollback}[subject]
	now := time.Now().UTC()
	vm := foVM
	op, err := c.store.CreateOperation(ctx, commands.Operation{ID: "op-" + uuid.NewString(), Type: typ,
		Status: commands.StatusPending, VolumeID: foRoot, VMID: &vm, VolumeIDs: []string{foRoot, foData},
		Request: data, CreatedAt: now, UpdatedAt: now})
	if err != nil {
		e := commands.Internal("store: %v", err)
		body, _ := json.Marshal(e)
		return commands.Answer{Status: e.Status, Body: body, Err: e}
	}
	body, _ := json.Marshal(op)
	return commands.Answer{Status: http.StatusCreated, Body: body}
}

func (c *recordingCommands) all() []sentCommand {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]sentCommand(nil), c.sent...)
}

// noBackend is a Backend these tests never reach.
type noBackend struct{ httpbridge.Backend }

// startBridge serves a real REST bridge on loopback over a real embedded
// bus and KV store, with a recordingCommands as its command service.
func startBridge(t *testing.T) (*client.Client, *recordingCommands, state.Store) {
	t.Helper()
	ctx := context.Background()
	b := testenv.StartBus(t)
	kv, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kv.Close(context.Background()) })
	cmds := &recordingCommands{store: kv}
	srv := httpbridge.New(httpbridge.Config{Listen: "127.0.0.1:0", Conn: b.Conn(), Commands: cmds, Store: kv,
		Backend: noBackend{}})
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })
	c, err := client.New("http://" + srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	return c, cmds, kv
}

// TestFailoverAndRollback drives a real bridge: Failover and Rollback
// send their command on the right subject with the right body and key,
// return the accepted operation, Wait returns the completed failover with
// its snapshots, and a bad failover id is refused before any command.
func TestFailoverAndRollback(t *testing.T) {
	c, cmds, store := startBridge(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	req := commands.FailoverRequest{VMID: foVM, RootVolumeID: foRoot, DataVolumeIDs: []string{foData}, Test: true, StartVM: true}
	op, err := c.Failover(ctx, req, client.WithIdempotencyKey("fo-1"))
	if err != nil || op.Type != commands.OpFailover || op.Status != commands.StatusPending || len(op.VolumeIDs) != 2 {
		t.Fatalf("Failover: %+v %v", op, err)
	}
	want, _ := json.Marshal(req)
	if s := cmds.all(); len(s) != 1 || s[0] != (sentCommand{commands.SubjectFailover, string(want), "fo-1"}) {
		t.Fatalf("sent %+v, want %s %s with key fo-1", s, commands.SubjectFailover, want)
	}

	// The workflow completes (as its kind would record it).
	rec, err := store.GetOperation(ctx, op.ID)
	if err != nil {
		t.Fatal(err)
	}
	done := time.Now().UTC()
	rec.Status, rec.CompletedAt, rec.UpdatedAt = commands.StatusExecuting, nil, done
	if rec, err = store.UpdateOperation(ctx, rec); err != nil {
		t.Fatal(err)
	}
	rec.Status, rec.CompletedAt = commands.StatusCompleted, &done
	rec.Response = &commands.OpResponse{VolumeID: foRoot, VMID: foVM, Snapshots: map[string]string{foRoot: foSnap},
		Before: map[string]commands.Placement{foRoot: {ExportName: "vol3f2b7c1e"}}, Message: "Failover completed"}
	if _, err := store.UpdateOperation(ctx, rec); err != nil {
		t.Fatal(err)
	}
	final, err := c.Wait(ctx, op.ID)
	if err != nil || final.Status != commands.StatusCompleted || final.Response.Snapshots[foRoot] != foSnap ||
		final.Response.Before[foRoot].ExportName != "vol3f2b7c1e" {
		t.Fatalf("Wait: %+v %v", final, err)
	}

	for _, id := range []string{op.ID, op.ID[len("op-"):]} {
		rb, err := c.Rollback(ctx, id)
		if err != nil || rb.Type != commands.OpRollback || rb.Status != commands.StatusPending {
			t.Fatalf("Rollback(%s): %+v %v", id, rb, err)
		}
		s := cmds.all()
		if last := s[len(s)-1]; last != (sentCommand{commands.SubjectRollback, `{"failover_id":"` + op.ID + `"}`, ""}) {
			t.Errorf("Rollback(%s) sent %+v", id, last)
		}
	}

	n := len(cmds.all())
	_, err = c.Rollback(ctx, foOpBad)
	var e *client.Error
	if !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Code() != commands.CodeInvalidRequest ||
		e.Details()["field"] != "operation_id" {
		t.Fatalf("Rollback(%q): %v", foOpBad, err)
	}
	if got := len(cmds.all()); got != n {
		t.Errorf("a refused rollback sent %d commands", got-n)
	}
}
