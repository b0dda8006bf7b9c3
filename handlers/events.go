package handlers

import (
	"context"
	"encoding/json"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
)

var _ engine.Publisher = (*Service)(nil)

// PublishOperation sends the operation's state on volumes.ops.<id>: the
// engine's Publisher. The engine publishes a state once it is written, so
// a create's end seen here is recorded, for the turn of the jobs on its
// volume.
func (s *Service) PublishOperation(ctx context.Context, op commands.Operation) {
	s.createsEnded.noteEnded(op)
	data, err := json.Marshal(op)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.cfg.JetStream.Publish(ctx, commands.OpSubject(op.ID), data); err != nil {
		s.log.Warn("cannot publish operation event", "operation_id", op.ID, "err", err)
	}
}

// announce publishes data, the first event of an accepted operation, without
// waiting for JetStream's ack: the record, already written, is what the
// answer stands on. It leaves on the connection before the job does, so
// one server stores it before any event of the job's execution (on a
// cluster, whose streams may have other leaders, normally so). It is sent
// once: a failure is logged (here, or by the bus when the ack says so),
// never sent again later, when it could come after the execution's
// events; and a full window of unacknowledged publishes holds the accept
// back at most announceStall.
func (s *Service) announce(opID string, data []byte) {
	if _, err := s.cfg.JetStream.PublishAsync(commands.OpSubject(opID), data,
		jetstream.WithRetryAttempts(0), jetstream.WithStallWait(announceStall)); err != nil {
		s.log.Warn("cannot publish operation event", "operation_id", opID, "err", err)
	}
}

// announceStall bounds how long announce waits for room among the
// unacknowledged publishes.
const announceStall = 50 * time.Millisecond
