package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/state"
)

// RelineJobs moves each job a volumed from before lines queued
// (volumed.jobs.<operation_id>) onto its operation's line (jobSubject), in
// queue order, before Start: the sweep looks for a job on its line only,
// and would queue a second one that the first then fights over the
// operation. Each is published under a message id of its sequence, then
// deleted, so a crash between the two duplicates nothing within the
// stream's deduplication window. A job whose operation is not recorded is
// left to dispatch, which drops it. Each request waits for a cluster still
// forming or catching up (formation.Wait), as the rest of start-up does.
func RelineJobs(ctx context.Context, js jetstream.JetStream, ops state.OperationReader, log *slog.Logger) error {
	var stream jetstream.Stream
	err := formation.Wait(ctx, log, "stream "+bus.StreamJobs, func(ctx context.Context) error {
		var err error
		stream, err = js.Stream(ctx, bus.StreamJobs)
		return err
	})
	if err != nil {
		return fmt.Errorf("handlers: reline jobs: %w", err)
	}
	st := stream.CachedInfo().State
	moved := 0
	for seq := st.FirstSeq; seq <= st.LastSeq && st.Msgs > 0; seq++ {
		var msg *jetstream.RawStreamMsg
		err := formation.Wait(ctx, log, "job "+strconv.FormatUint(seq, 10), func(ctx context.Context) error {
			var err error
			msg, err = stream.GetMsg(ctx, seq)
			return err
		})
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("handlers: reline jobs: read %d: %w", seq, err)
		}
		if strings.Contains(strings.TrimPrefix(msg.Subject, bus.JobsSubjectPrefix), ".") {
			continue // on its line
		}
		var j job
		if err := json.Unmarshal(msg.Data, &j); err != nil || j.OperationID == "" {
			continue
		}
		var op commands.Operation
		err = formation.Wait(ctx, log, "operation "+j.OperationID, func(ctx context.Context) error {
			var err error
			op, err = ops.GetOperation(ctx, j.OperationID)
			return err
		})
		if errors.Is(err, state.ErrNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("handlers: reline jobs: operation %s: %w", j.OperationID, err)
		}
		// Published again after a lost answer, the message id makes the
		// copy a duplicate.
		err = formation.Wait(ctx, log, "reline job of "+op.ID, func(ctx context.Context) error {
			_, err := js.Publish(ctx, jobSubject(op), msg.Data, jetstream.WithMsgID("volumed-reline:"+strconv.FormatUint(seq, 10)))
			return err
		})
		if err != nil {
			return fmt.Errorf("handlers: reline job of %s: %w", op.ID, err)
		}
		err = formation.Wait(ctx, log, "job "+strconv.FormatUint(seq, 10), func(ctx context.Context) error {
			return stream.DeleteMsg(ctx, seq)
		})
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return fmt.Errorf("handlers: reline job of %s: delete the old one: %w", op.ID, err)
		}
		moved++
	}
	if moved > 0 {
		log.Info("jobs queued before lines moved onto their operation's line", "component", "upgrade", "jobs", moved)
	}
	return nil
}
