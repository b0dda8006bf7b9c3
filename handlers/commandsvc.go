package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
)

// ServiceName is the name of volumed's NATS micro service: `nats micro
// info volumed` lists its endpoints, one per command subject.
const ServiceName = "volumed"

// DefaultAcceptConcurrency bounds the commands accepted at once.
const DefaultAcceptConcurrency = 128

// RetryAfter is what a 503 answer asks the client to wait, in its
// Retry-After header.
const RetryAfter = time.Second

// endpoint is one command of the micro service.
type endpoint struct {
	name, subject string
	// status is the HTTP status of a success.
	status int
	// timeout bounds the command; its answer comes before it.
	timeout time.Duration
	run     func(ctx context.Context, data []byte, key string) (any, error)
}

func (s *Service) endpoints() []endpoint {
	accept := func(name, subject string, run func(ctx context.Context, data []byte, key string) (any, error)) endpoint {
		return endpoint{name: name, subject: subject, status: http.StatusCreated, timeout: commands.AcceptTimeout, run: run}
	}
	return []endpoint{
		accept("create", commands.SubjectCreate, s.acceptCreate),
		accept("attach", commands.SubjectAttach, func(ctx context.Context, d []byte, key string) (any, error) {
			return s.acceptAttach(ctx, d, key, false)
		}),
		accept("attach-root", commands.SubjectAttachRoot, func(ctx context.Context, d []byte, key string) (any, error) {
			return s.acceptAttach(ctx, d, key, true)
		}),
		accept("detach", commands.SubjectDetach, func(ctx context.Context, d []byte, key string) (any, error) {
			return s.acceptVolume(ctx, d, key, commands.OpDetach)
		}),
		accept("delete", commands.SubjectDelete, func(ctx context.Context, d []byte, key string) (any, error) {
			return s.acceptVolume(ctx, d, key, commands.OpDelete)
		}),
		accept("export", commands.SubjectExport, s.acceptExport),
		accept("unexport", commands.SubjectUnexport, s.acceptUnexport),
		{name: "force-sync", subject: commands.SubjectForceSync, status: http.StatusOK, timeout: commands.ForceSyncTimeout,
			run: func(ctx context.Context, _ []byte, _ string) (any, error) { return s.Reconcile(ctx) }},
	}
}

// acceptStats are the command service's own counters, shown in the
// endpoints' data by `nats micro stats volumed`.
type acceptStats struct {
	// inflight counts the commands being handled now.
	inflight atomic.Int64
	// rejected counts the commands answered 503 because the service was full.
	rejected atomic.Int64
	// failed counts the answers with a 4xx or 5xx status.
	failed atomic.Int64
}

// startCommands registers the micro service "volumed" with one endpoint
// per command subject, in the QueueGroup queue group.
func (s *Service) startCommands() error {
	svc, err := micro.AddService(s.cfg.Conn, micro.Config{
		Name:        ServiceName,
		Version:     s.cfg.Version,
		Description: "volumed commands: the reply is the operation or the error JSON, the HTTP status in the Status header",
		QueueGroup:  QueueGroup,
		StatsHandler: func(*micro.Endpoint) any {
			return map[string]int64{"inflight": s.accepts.inflight.Load(), "rejected_full": s.accepts.rejected.Load(),
				"errors": s.accepts.failed.Load(), "capacity": int64(cap(s.acceptSlots))}
		},
	})
	if err != nil {
		return fmt.Errorf("handlers: micro service: %w", err)
	}
	s.micro = svc
	for _, ep := range s.endpoints() {
		if err := svc.AddEndpoint(ep.name, s.serve(ep), micro.WithEndpointSubject(ep.subject)); err != nil {
			return fmt.Errorf("handlers: endpoint %s: %w", ep.subject, err)
		}
	}
	return nil
}

// serve is an endpoint's micro handler. micro calls it serially per
// endpoint, so it only takes a slot of the bounded pool and hands the
// request to a goroutine; when every slot is taken it answers 503 with
// Retry-After at once, before anything is looked at or recorded. A
// command runs to its answer under its own timeout even while the
// service stops (Close waits for it); force-sync is cancelled.
func (s *Service) serve(ep endpoint) micro.Handler {
	return micro.HandlerFunc(func(req micro.Request) {
		if bus.FromConsumerReply(req.Reply()) {
			return // a copy a JetStream consumer delivered here, not a command
		}
		select {
		case s.acceptSlots <- struct{}{}:
		default:
			s.accepts.rejected.Add(1) // counted, not logged: a burst would flood the log
			s.reply(req, ep, nil, commands.Unavailable("volumed is handling %d commands; retry later", cap(s.acceptSlots)).
				WithDetail("retry_after_seconds", int(RetryAfter/time.Second)))
			return
		}
		s.mu.Lock()
		if s.stopping {
			s.mu.Unlock()
			<-s.acceptSlots
			s.reply(req, ep, nil, commands.Unavailable("volumed is stopping"))
			return
		}
		parent, wg := s.ctx, &s.wg
		if ep.status == http.StatusCreated {
			parent, wg = context.WithoutCancel(s.ctx), &s.accepting
		}
		wg.Add(1)
		s.mu.Unlock()
		s.accepts.inflight.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-s.acceptSlots; s.accepts.inflight.Add(-1) }()
			ctx, cancel := context.WithTimeout(parent, ep.timeout)
			defer cancel()
			result, err := ep.run(ctx, req.Data(), req.Headers().Get(commands.IdempotencyKeyHeader))
			s.reply(req, ep, result, err)
		}()
	})
}

// reply answers a command: the result JSON with the endpoint's status, or
// the error JSON with its own, in the Status header. An error also carries
// micro's error headers (code = the HTTP status), and a 503 Retry-After.
// It publishes the reply itself rather than through req, which micro reads
// once its handler has returned.
func (s *Service) reply(req micro.Request, ep endpoint, result any, err error) {
	status := ep.status
	msg := nats.NewMsg(req.Reply())
	if err != nil {
		apiErr := commands.AsError(err)
		status, result = apiErr.Status, apiErr
		switch {
		case status == http.StatusServiceUnavailable && apiErr.Details["retry_after_seconds"] == nil:
			s.log.Warn("command refused", "subject", ep.subject, "err", err)
		case status >= 500 && status != http.StatusServiceUnavailable:
			s.log.Error("command failed", "subject", ep.subject, "status", status, "err", err)
		}
		s.accepts.failed.Add(1)
		msg.Header.Set(micro.ErrorCodeHeader, strconv.Itoa(status))
		msg.Header.Set(micro.ErrorHeader, apiErr.Message)
		if status == http.StatusServiceUnavailable {
			msg.Header.Set(commands.RetryAfterHeader, strconv.Itoa(int(RetryAfter/time.Second)))
		}
	}
	msg.Header.Set(commands.StatusHeader, strconv.Itoa(status))
	msg.Data, _ = json.Marshal(result)
	if req.Reply() == "" {
		return
	}
	if err := s.cfg.Conn.PublishMsg(msg); err != nil {
		s.log.Warn("reply failed", "subject", ep.subject, "err", err)
	}
}
