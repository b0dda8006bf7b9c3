package state

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"time"

	"github.com/volumed/volumed/commands"
)

// The retention's one exception (see Pruner): a completed test failover
// is what its rollback undoes, so it is held, with the failed and
// cancelled rollbacks of it (a rollback asked again reads what they
// reverted), until a rollback of it completes or fails NOT_FOUND
// (closes); then they age out counted from that rollback's end. Each store keeps the held operations apart
// from the ones it prunes, so a pass never walks them again and again.

// MayHold reports whether the retention may hold an operation of type
// t past its end: a failover or a rollback. The stores look at no other.
func MayHold(t commands.OpType) bool { return t == commands.OpFailover || t == commands.OpRollback }

// TestFailover reports whether op is a completed test failover, the one
// kind of failover a rollback undoes: it recorded its workflow and was
// asked with test true (the default).
func TestFailover(op commands.Operation) bool {
	if op.Type != commands.OpFailover || op.Status != commands.StatusCompleted || op.Workflow == nil {
		return false
	}
	var req struct {
		Test *bool `json:"test"`
	}
	return json.Unmarshal(op.Request, &req) == nil && (req.Test == nil || *req.Test)
}

// RollbackOf returns the failover a rollback rolls back; "" for any
// other operation, or a request that does not say.
func RollbackOf(op commands.Operation) string {
	if op.Type != commands.OpRollback {
		return ""
	}
	var req commands.RollbackRequest
	if json.Unmarshal(op.Request, &req) != nil {
		return ""
	}
	return req.FailoverID
}

// RollbacksOf returns the recorded rollbacks of the failover failoverID
// whose root volume is rootID, in any status, newest first.
func RollbacksOf(ctx context.Context, r OperationReader, failoverID, rootID string) ([]commands.Operation, error) {
	var out []commands.Operation
	f := Filter{Type: commands.OpRollback, VolumeID: rootID}
	for {
		page, next, err := r.ListOperations(ctx, f)
		if err != nil {
			return nil, err
		}
		for _, op := range page {
			if RollbackOf(op) == failoverID {
				out = append(out, op)
			}
		}
		if next == "" {
			return out, nil
		}
		f.Cursor = next
	}
}

// RetainedEnd returns when the retention counts the terminal operation
// op to have ended: CompletedAt(op), but for a completed test failover
// and a failed or cancelled rollback of one, the end of the failover's
// latest rollback that closes it; held is true while none did, or one
// is pending or executing (op is kept whatever its age). A rollback that closes a test failover is held
// while the failover is recorded, so it is pruned after it (a store
// prunes the failovers it holds before the rollbacks).
func RetainedEnd(ctx context.Context, r OperationReader, op commands.Operation) (end time.Time, held bool, err error) {
	end = CompletedAt(op)
	fo := op
	switch op.Type {
	case commands.OpRollback:
		id := RollbackOf(op)
		if id == "" {
			return end, false, nil
		}
		if fo, err = r.GetOperation(ctx, id); err != nil {
			if errors.Is(err, ErrNotFound) {
				return end, false, nil
			}
			return end, false, err
		}
		if closes(op) {
			return end, TestFailover(fo), nil
		}
	case commands.OpFailover:
	default:
		return end, false, nil
	}
	if !TestFailover(fo) {
		return end, false, nil
	}
	rbs, err := RollbacksOf(ctx, r, fo.ID, fo.VolumeID)
	if err != nil {
		return end, false, err
	}
	held = true
	for _, rb := range rbs {
		if !rb.Status.Terminal() {
			// Asked again after one that failed NOT_FOUND: it reads
			// the failover.
			return end, true, nil
		}
		if closes(rb) {
			held, end = false, maxTime(end, CompletedAt(rb))
		}
	}
	return end, held, nil
}

// closes reports whether the rollback rb closes its failover for the
// retention: it completed, or it failed NOT_FOUND (a volume, snapshot or
// VM it acts on is gone from CloudStack), after which no rollback of that
// failover can complete.
func closes(rb commands.Operation) bool {
	code, _ := rb.Details["code"].(string)
	return rb.Status == commands.StatusCompleted || rb.Status == commands.StatusFailed && code == commands.CodeNotFound
}

// PruneHeld ends a prune call that deleted n of the operations it
// walked, with limit (0: no limit): unless those filled the batch, it
// deletes with del, failovers first, up to the rest of it of the
// operations a store holds apart (load reads them) whose retained end
// (RetainedEnd) is before the score cut, and counts all it deleted; del's
// ErrStale (changed meanwhile) skips one.
func PruneHeld(ctx context.Context, r OperationReader, n, limit int, cut int64,
	load func(context.Context) ([]commands.Operation, error), del func(commands.Operation) error) (int, error) {
	if limit > 0 && n >= limit {
		return n, nil // the held ones wait for the call that does not fill its batch
	}
	ops, err := load(ctx)
	if err != nil {
		return n, err
	}
	slices.SortStableFunc(ops, heldFirst)
	for _, op := range ops {
		if limit > 0 && n >= limit {
			break
		}
		end, held, err := RetainedEnd(ctx, r, op)
		if err != nil {
			return n, err
		}
		if held || opScore(end) >= cut {
			continue
		}
		if err := del(op); errors.Is(err, ErrStale) {
			continue
		} else if err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// heldFirst orders operations the retention holds as a store prunes
// them: failovers before rollbacks (see RetainedEnd).
func heldFirst(a, b commands.Operation) int {
	return cmp.Compare(heldRank(a.Type), heldRank(b.Type))
}

func heldRank(t commands.OpType) int {
	if t == commands.OpFailover {
		return 0
	}
	return 1
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
