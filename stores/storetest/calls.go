package storetest

import (
	"context"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Call is one call of a Store method.
type Call struct {
	Name string
	Fn   func(context.Context, state.Store) error
}

// Calls calls every Store method that reaches the backend, with op a
// recorded operation.
func Calls(op commands.Operation) []Call {
	m := Mapping("vol-1", "vm-1", "/dev/vdb")
	return []Call{
		{"CreateOperation", func(ctx context.Context, s state.Store) error {
			next := op
			next.ID = ID(2)
			_, err := s.CreateOperation(ctx, next)
			return err
		}},
		{"UpdateOperation", func(ctx context.Context, s state.Store) error {
			next := op
			next.Status = commands.StatusExecuting
			_, err := s.UpdateOperation(ctx, next)
			return err
		}},
		{"DeleteOperation", func(ctx context.Context, s state.Store) error { return s.DeleteOperation(ctx, op.ID, op.Revision) }},
		{"PruneOperations", func(ctx context.Context, s state.Store) error {
			_, err := s.PruneOperations(ctx, time.Now(), 10)
			return err
		}},
		{"GetOperation", func(ctx context.Context, s state.Store) error { _, err := s.GetOperation(ctx, op.ID); return err }},
		{"ListOperations", func(ctx context.Context, s state.Store) error {
			_, _, err := s.ListOperations(ctx, state.Filter{Type: op.Type, Limit: 5})
			return err
		}},
		{"Stats", func(ctx context.Context, s state.Store) error { _, err := s.Stats(ctx); return err }},
		{"PutMapping", func(ctx context.Context, s state.Store) error { _, err := s.PutMapping(ctx, m); return err }},
		{"GetMapping", func(ctx context.Context, s state.Store) error { _, err := s.GetMapping(ctx, m.VolumeID); return err }},
		{"GetMappingByDevice", func(ctx context.Context, s state.Store) error {
			_, err := s.GetMappingByDevice(ctx, m.VMID, m.DevicePath)
			return err
		}},
		{"ListMappings", func(ctx context.Context, s state.Store) error { _, err := s.ListMappings(ctx, ""); return err }},
		{"DeleteMapping", func(ctx context.Context, s state.Store) error { return s.DeleteMapping(ctx, m.VolumeID, 0) }},
		{"PutExport", func(ctx context.Context, s state.Store) error {
			_, err := s.PutExport(ctx, Export(ID(1), true))
			return err
		}},
		{"GetExport", func(ctx context.Context, s state.Store) error {
			_, err := s.GetExport(ctx, ID(1))
			return err
		}},
		{"ListExports", func(ctx context.Context, s state.Store) error { _, err := s.ListExports(ctx); return err }},
		{"DeleteExport", func(ctx context.Context, s state.Store) error { return s.DeleteExport(ctx, ID(1), 0) }},
		{"AcquireLease", func(ctx context.Context, s state.Store) error {
			_, err := s.AcquireLease(ctx, "l", "me", time.Second)
			return err
		}},
		{"RenewLease", func(ctx context.Context, s state.Store) error {
			_, err := s.RenewLease(ctx, state.Lease{Name: "l", Holder: "me", Token: 1, TTL: time.Second})
			return err
		}},
		{"ReleaseLease", func(ctx context.Context, s state.Store) error {
			return s.ReleaseLease(ctx, state.Lease{Name: "l", Holder: "me", Token: 1, TTL: time.Second})
		}},
		{"Ping", func(ctx context.Context, s state.Store) error { return s.Ping(ctx) }},
	}
}
