package handlers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/state"
)

// Accept budgets, inside commands.AcceptTimeout.
const (
	// DefaultCheckTimeout bounds the pre-checks of one command (cache
	// refreshes and the volume lookup): past it the command is accepted
	// unchecked, and the store write keeps the rest of the budget.
	DefaultCheckTimeout = 1500 * time.Millisecond
	// writeAttempt bounds one attempt at the record; an unanswered attempt
	// is resolved by creating again with the same id.
	writeAttempt = 2 * time.Second
	// undoReserve is kept back from the record's attempts for queueing the
	// job and, if that fails, undoing the record.
	undoReserve = 2 * time.Second
	// forgetTimeout bounds the background removal of a record whose write
	// could not be resolved in time.
	forgetTimeout = time.Minute
)

// Backoffs of acceptance: between attempts at the record, and between
// tries to remove a record answered 503.
var (
	recordBackoff = backoff.Policy{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}
	forgetBackoff = backoff.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second}
)

// idemNamespace derives operation ids from idempotency keys.
var idemNamespace = uuid.MustParse("5b0e7a4c-2f61-4d8e-9a3b-7c1d0e2f4a65")

// OperationIDForKey is the id of the operation a command with this
// Idempotency-Key records: "op-" and the SHA-1 (version 5) UUID of the key.
func OperationIDForKey(key string) string {
	return "op-" + uuid.NewSHA1(idemNamespace, []byte(key)).String()
}

// operationID is the id of a new operation: derived from the
// Idempotency-Key when there is one, random otherwise.
func operationID(key string) string {
	if key == "" {
		return "op-" + uuid.NewString()
	}
	return OperationIDForKey(key)
}

// accept runs a command's acceptance: an operation already recorded
// under the Idempotency-Key answers again; else the pre-checks (their own
// budget), the record (the write that decides the answer), its first
// event (not waited for) and its job. A job that cannot be queued undoes the record and
// answers 503; if the undo fails, the record stands and the answer is
// 201 (the queue's sweep queues it).
func (s *Service) accept(ctx context.Context, key string, typ commands.OpType, cmd engine.Command) (any, error) {
	if err := commands.ValidateIdempotencyKey(key); err != nil {
		return nil, err
	}
	raw, err := json.Marshal(cmd.Request)
	if err != nil {
		return nil, commands.Internal("encode request: %v", err)
	}
	id := operationID(key)
	if key != "" {
		seen, err := s.cfg.Store.GetOperation(ctx, id)
		switch {
		case err == nil:
			return s.seenBefore(ctx, seen, key, typ, raw)
		case !errors.Is(err, state.ErrNotFound):
			return nil, state.APIError(err)
		}
	}
	if cmd.Check != nil {
		checkCtx, cancel := context.WithTimeout(ctx, s.cfg.CheckTimeout)
		err = cmd.Check(ctx, checkCtx)
		cancel()
		if err != nil {
			// The same command sent again while the first was recorded
			// and ran (its answer lost): the record answers, not the
			// state it left (a deleted volume's 404).
			if key == "" {
				return nil, err
			}
			if seen, gerr := s.cfg.Store.GetOperation(ctx, id); gerr == nil {
				return s.seenBefore(ctx, seen, key, typ, raw)
			}
			return nil, err
		}
	}
	now := time.Now().UTC()
	op := commands.Operation{
		ID: id, Type: typ, Status: commands.StatusPending,
		VolumeID: cmd.VolumeID, VMID: cmd.VMID, VolumeIDs: cmd.VolumeIDs, Request: raw, CreatedAt: now, UpdatedAt: now,
		RequestedBy: commands.Requester(ctx),
	}
	rec, err := s.record(ctx, op)
	var seen *seenError
	switch {
	case errors.As(err, &seen):
		return s.seenBefore(ctx, seen.op, key, typ, raw)
	case err != nil:
		return nil, err
	}
	data, err := json.Marshal(rec) // once, for the first event and the answer
	if err != nil {
		return s.undo(rec, err)
	}
	s.announce(rec.ID, data) // before the job, so no event of its execution comes first
	if err := s.enqueue(ctx, rec); err != nil {
		s.log.Error("queue unavailable", "operation_id", rec.ID, "err", err)
		return s.undo(rec, err)
	}
	s.log.Debug("operation accepted", "operation_id", rec.ID, "type", rec.Type, "volume_id", rec.VolumeID)
	return json.RawMessage(data), nil
}

// seenBefore answers a command whose Idempotency-Key names a recorded
// operation: the same command answers that operation again; any other is
// 409 CONFLICT. A pending operation whose job is missing (the instance
// that recorded it died before queueing it, so its client got no answer
// and retries) is queued now, as the sweep would later.
func (s *Service) seenBefore(ctx context.Context, op commands.Operation, key string, typ commands.OpType, raw []byte) (any, error) {
	if op.Type != typ || !bytes.Equal(op.Request, raw) {
		return nil, commands.Conflict("Idempotency-Key %q was used for another command (operation %s)", commands.Shown(key, 80), op.ID).
			WithDetail("idempotency_key", key).WithDetail("operation_id", op.ID)
	}
	if op.Status == commands.StatusPending {
		if requeued, err := s.requeueMissing(ctx, op); err != nil {
			s.log.Warn("cannot requeue a retried operation; the sweep will", "operation_id", op.ID, "err", err)
		} else if requeued {
			s.log.Info("requeued a retried operation whose job was missing", "operation_id", op.ID)
		}
	}
	return op, nil
}

// seenError: the id is recorded by an earlier command.
type seenError struct{ op commands.Operation }

func (e *seenError) Error() string { return "operation " + e.op.ID + " already recorded" }

// record creates op in the store. An attempt the store does not answer
// may have been written, so it is resolved by asking the store: creating
// again with the same id either records it or finds it (ours if it is
// the very record, same creation time and request). If the store stays
// silent until the budget (less undoReserve) is spent, the answer is 503,
// and a record that may have been written is removed in the background
// before anything runs it.
func (s *Service) record(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	deadline, _ := ctx.Deadline()
	var lastErr error
	pause := recordBackoff.Start()
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			backoff.Sleep(ctx, pause.Next())
		}
		left := time.Until(deadline) - undoReserve
		if attempt > 0 && left <= 0 {
			break
		}
		actx, cancel := context.WithTimeout(ctx, min(writeAttempt, max(left, writeAttempt/4)))
		rec, err := s.cfg.Store.CreateOperation(actx, op)
		cancel()
		switch {
		case err == nil:
			return rec, nil
		case errors.Is(err, state.ErrExists):
			got, gerr := s.cfg.Store.GetOperation(ctx, op.ID)
			switch {
			case gerr == nil && sameRecord(got, op):
				return got, nil // an earlier attempt of ours was written
			case gerr == nil:
				return commands.Operation{}, &seenError{got}
			case errors.Is(gerr, state.ErrNotFound):
				continue // removed since: create again
			}
			lastErr = gerr
		case errors.Is(err, state.ErrUnavailable):
			lastErr = err
		default:
			return commands.Operation{}, state.APIError(err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	s.forget(op)
	return commands.Operation{}, state.APIError(lastErr)
}

// sameRecord reports whether got is the record op was written as.
func sameRecord(got, op commands.Operation) bool {
	return got.Type == op.Type && got.CreatedAt.Equal(op.CreatedAt) && bytes.Equal(got.Request, op.Request)
}

// undo removes the record of an operation whose job could not be queued
// and answers 503. If the removal fails, the store is asked what stands:
// a record that stands is the answer (201), since the sweep queues it.
func (s *Service) undo(rec commands.Operation, cause error) (any, error) {
	ctx, cancel := context.WithTimeout(s.ctx, undoReserve)
	defer cancel()
	refused := commands.Unavailable("command queue unavailable: %v", cause)
	err := s.cfg.Store.DeleteOperation(ctx, rec.ID, rec.Revision)
	if err == nil || errors.Is(err, state.ErrNotFound) {
		s.publishUndone(rec)
		return nil, refused
	}
	got, gerr := s.cfg.Store.GetOperation(ctx, rec.ID)
	switch {
	case errors.Is(gerr, state.ErrNotFound):
		s.publishUndone(rec)
		return nil, refused
	case gerr == nil:
		rec = got
	}
	s.log.Warn("accepted without a job; the sweep queues it", "operation_id", rec.ID, "err", err)
	return rec, nil
}

// publishUndone ends the event history of an operation that was never
// accepted: cancelled, saying why.
func (s *Service) publishUndone(op commands.Operation) {
	now := time.Now().UTC()
	op.Status, op.UpdatedAt, op.CompletedAt = commands.StatusCancelled, now, &now
	op.Error = "not accepted: the command queue was unavailable"
	s.PublishOperation(s.ctx, op)
}

// forget removes, in the background, a record whose write could not be
// resolved, if it exists and nothing has claimed it, so that the 503
// answered for it holds.
func (s *Service) forget(op commands.Operation) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(s.ctx, forgetTimeout)
		defer cancel()
		for wait := forgetBackoff.Start(); ; {
			got, err := s.cfg.Store.GetOperation(ctx, op.ID)
			switch {
			case errors.Is(err, state.ErrNotFound), err == nil && !sameRecord(got, op):
				return // never written, or another command's (same Idempotency-Key)
			case err == nil && (got.Status != commands.StatusPending || got.Attempts > 0):
				s.log.Error("an operation answered 503 was recorded and claimed", "operation_id", op.ID, "status", got.Status)
				return
			case err == nil:
				if err = s.cfg.Store.DeleteOperation(ctx, op.ID, got.Revision); err == nil || errors.Is(err, state.ErrNotFound) {
					s.log.Warn("removed the record of an operation answered 503", "operation_id", op.ID)
					return
				}
			}
			if !wait.Wait(ctx, 0) {
				s.log.Error("could not resolve the record of an operation answered 503", "operation_id", op.ID, "err", err)
				return
			}
		}
	}()
}

// catalog answers the kinds' pre-checks from the inventory's cache, whose
// refreshes run under the service's context.
type catalog struct{ s *Service }

var _ kinds.Catalog = catalog{}

func (c catalog) Unlisted(ctx context.Context, list kinds.List, id string) bool {
	set := map[kinds.List]*entitySet{kinds.Zones: c.s.inventory.zones, kinds.Offerings: c.s.inventory.offerings, kinds.VMs: c.s.inventory.vms}[list]
	return set.lookup(ctx, c.s.ctx, &c.s.wg, id) == absent
}
