package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
)

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

// endpoints are the commands of the registered kinds, each on its
// subjects, and the force-sync.
func (s *Service) endpoints() []endpoint {
	var eps []endpoint
	for _, k := range s.engine.Kinds() {
		a, ok := k.(engine.Accepter)
		if !ok {
			continue
		}
		for _, e := range a.Endpoints() {
			typ, subject := k.Type(), e.Subject
			eps = append(eps, endpoint{name: e.Name, subject: subject, status: http.StatusCreated, timeout: commands.AcceptTimeout,
				run: func(ctx context.Context, data []byte, key string) (any, error) {
					cmd, err := a.Decode(ctx, subject, data)
					if err != nil {
						return nil, err
					}
					if len(cmd.VolumeIDs) > 0 {
						cmd.Check = s.servedEverywhere(subject, cmd.Check)
					}
					return s.accept(ctx, key, typ, cmd)
				}})
		}
	}
	return append(eps, endpoint{name: "force-sync", subject: commands.SubjectForceSync, status: http.StatusOK, timeout: commands.ForceSyncTimeout,
		run: func(ctx context.Context, data []byte, _ string) (any, error) {
			if err := commands.DecodeForceSync(data); err != nil {
				return nil, err
			}
			return s.Reconcile(ctx)
		}})
}

// Discovery of the command service's instances ($SRV.INFO.volumed).
const (
	// discoveryWait bounds the wait for the instances' answers.
	discoveryWait = 500 * time.Millisecond
	// discoveryQuiet ends the wait once no answer has come for this long
	// since the last one.
	discoveryQuiet = 100 * time.Millisecond
)

// servedEverywhere adds to a command's pre-checks (check, nil for none)
// that every running instance serves its subject: a command on several
// volumes is queued as a job and holds on several lines, and an instance
// of an earlier release that does not know its type, delivered one of
// them, would fail the operation. Both run at once; the refusal of
// unserved wins over the check's error.
func (s *Service) servedEverywhere(subject string, check func(ctx, checkCtx context.Context) error) func(ctx, checkCtx context.Context) error {
	return func(ctx, checkCtx context.Context) error {
		served := make(chan error, 1)
		go func() { served <- s.unserved(ctx, subject) }()
		var err error
		if check != nil {
			err = check(ctx, checkCtx)
		}
		if refused := <-served; refused != nil {
			return refused
		}
		return err
	}
}

// unserved asks every instance of the command service for its endpoints
// (micro's INFO, not cached) and answers 503 naming those that do not
// serve subject, or when none answered. It reads the answers for up to
// discoveryWait, until none came for discoveryQuiet: an instance that
// answers later is not seen.
func (s *Service) unserved(ctx context.Context, subject string) error {
	info, err := micro.ControlSubject(micro.InfoVerb, commands.ServiceName, "")
	if err != nil {
		return commands.Internal("service discovery: %v", err)
	}
	inbox := s.cfg.Conn.NewInbox()
	sub, err := s.cfg.Conn.SubscribeSync(inbox)
	if err != nil {
		return commands.Unavailable("service discovery: %v", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := s.cfg.Conn.PublishRequest(info, inbox, nil); err != nil {
		return commands.Unavailable("service discovery: %v", err)
	}
	end := time.Now().Add(discoveryWait)
	answered := 0
	var names []string
	var lacking []map[string]string
	for {
		wait := time.Until(end)
		if answered > 0 {
			wait = min(wait, discoveryQuiet)
		}
		wctx, cancel := context.WithTimeout(ctx, wait)
		msg, err := sub.NextMsgWithContext(wctx)
		cancel()
		if err != nil {
			break // the time is up, or the command's
		}
		var got micro.Info
		if err := json.Unmarshal(msg.Data, &got); err != nil {
			s.log.Warn("unreadable answer to service discovery", "err", err)
			continue
		}
		answered++
		if !slices.ContainsFunc(got.Endpoints, func(e micro.EndpointInfo) bool { return e.Subject == subject }) {
			names = append(names, fmt.Sprintf("%s (version %s)", got.ID, got.Version))
			lacking = append(lacking, map[string]string{"id": got.ID, "version": got.Version})
		}
	}
	switch {
	case len(lacking) > 0:
		return commands.Unavailable("an earlier volumed is running: instance(s) %s do not serve %s; upgrade every instance first",
			strings.Join(names, ", "), subject).WithDetail("subject", subject).WithDetail("instances", lacking)
	case answered == 0:
		return commands.Unavailable("no volumed instance answered service discovery within %v: cannot tell whether every instance serves %s", discoveryWait, subject).
			WithDetail("subject", subject)
	}
	return nil
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
	svc, err := micro.AddService(s.cfg.ServiceConn, micro.Config{
		Name:        commands.ServiceName,
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
	for _, subject := range slices.Sorted(maps.Keys(s.bySubject)) {
		ep := s.bySubject[subject]
		if err := svc.AddEndpoint(ep.name, s.serve(ep), micro.WithEndpointSubject(ep.subject)); err != nil {
			return fmt.Errorf("handlers: endpoint %s: %w", ep.subject, err)
		}
	}
	return nil
}

// admit takes a slot of the bounded pool for a command of ep and returns
// the context it runs under and the function that ends it. When every slot
// is taken, or the service is stopping, it answers 503 at once, before
// anything is looked at or recorded. An accepted command runs to its
// answer under its own timeout even while the service stops (Close waits
// for it): cut short, its answer could contradict what was recorded. A
// force-sync runs under parent, and stops with the service.
func (s *Service) admit(parent context.Context, ep endpoint) (context.Context, func(), error) {
	select {
	case s.acceptSlots <- struct{}{}:
	default:
		s.accepts.rejected.Add(1) // counted, not logged: a burst would flood the log
		return nil, nil, commands.Unavailable("volumed is handling %d commands; retry later", cap(s.acceptSlots)).
			WithDetail("retry_after_seconds", int(RetryAfter/time.Second))
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		<-s.acceptSlots
		return nil, nil, commands.Unavailable("volumed is stopping")
	}
	wg := &s.wg
	var stop func() bool
	if ep.status == http.StatusCreated {
		parent, wg = context.WithoutCancel(s.ctx), &s.accepting
	}
	wg.Add(1)
	s.mu.Unlock()
	s.accepts.inflight.Add(1)
	ctx, cancel := context.WithTimeout(parent, ep.timeout)
	if ep.status != http.StatusCreated {
		stop = context.AfterFunc(s.ctx, cancel)
	}
	return ctx, func() {
		if stop != nil {
			stop()
		}
		cancel()
		<-s.acceptSlots
		s.accepts.inflight.Add(-1)
		wg.Done()
	}, nil
}

// serve is an endpoint's micro handler. micro calls it serially per
// endpoint, so it only admits the command and hands it to a goroutine.
func (s *Service) serve(ep endpoint) micro.Handler {
	return micro.HandlerFunc(func(req micro.Request) {
		if bus.FromConsumerReply(req.Reply()) {
			return // a copy a JetStream consumer delivered here, not a command
		}
		if req.Reply() != "" && !bus.ReplyAllowed(req.Reply()) {
			// Answering would publish on a subject only volumed may
			// publish to; the command is not run either.
			s.accepts.failed.Add(1)
			s.log.Warn("command refused: its reply subject is one of volumed's or the server's",
				"subject", ep.subject, "reply", req.Reply())
			return
		}
		key, err := idempotencyKey(req.Headers())
		if err != nil {
			s.reply(req, s.answer(ep, nil, err))
			return
		}
		ctx, done, err := s.admit(s.ctx, ep)
		if err != nil {
			s.reply(req, s.answer(ep, nil, err))
			return
		}
		go func() {
			defer done()
			ctx := commands.WithRequester(ctx, natsRequester(req))
			result, err := ep.run(ctx, req.Data(), key)
			s.reply(req, s.answer(ep, result, err))
		}()
	})
}

// idempotencyKey is a NATS request's Idempotency-Key, its header name in
// any case as on REST (NATS header names are case-sensitive: a key sent
// as "idempotency-key" was ignored, and a retry made a second operation).
// Different values under several spellings are 400.
func idempotencyKey(h micro.Headers) (string, error) {
	key := ""
	for name, values := range h {
		if !strings.EqualFold(name, commands.IdempotencyKeyHeader) || len(values) == 0 {
			continue
		}
		if key != "" && values[0] != key {
			return "", commands.Invalid(commands.IdempotencyKeyHeader, "%s given twice, with different values", commands.IdempotencyKeyHeader)
		}
		key = values[0]
	}
	return key, nil
}

// natsRequester names who asked for a command that came on NATS: the one
// place the NATS edge derives the operation's requested_by from the
// request. The server's authorization names the sender, never what the
// request carries: only the operator role may publish a command
// (bus.CommandRequester).
func natsRequester(micro.Request) string { return bus.CommandRequester }

// Command runs the command of subject in this process, admitted and
// bounded exactly as its NATS endpoint is, and returns its answer: the
// REST bridge's way in, without a NATS round trip. key is the request's
// Idempotency-Key. An accepted command runs to its answer whatever
// happens to ctx; a force-sync stops with ctx.
func (s *Service) Command(ctx context.Context, subject string, data []byte, key string) commands.Answer {
	ep, ok := s.bySubject[subject]
	if !ok {
		return s.answer(endpoint{subject: subject}, nil, commands.Internal("no command on subject %s", subject))
	}
	who := commands.Requester(ctx)
	ctx, done, err := s.admit(ctx, ep)
	if err != nil {
		return s.answer(ep, nil, err)
	}
	defer done()
	// admit detaches an accepted command from ctx, values and all.
	result, err := ep.run(commands.WithRequester(ctx, who), data, key)
	return s.answer(ep, result, err)
}

// answer builds a command's answer: the result JSON with the endpoint's
// status, or the error JSON with its own. Failures are counted and logged
// here, once for both ways in.
func (s *Service) answer(ep endpoint, result any, err error) commands.Answer {
	a := commands.Answer{Status: ep.status}
	if err != nil {
		a.Err = commands.AsError(err)
		a.Status, result = a.Err.Status, a.Err
		switch {
		case a.Status == http.StatusServiceUnavailable && a.Err.Details["retry_after_seconds"] == nil:
			s.log.Warn("command refused", "subject", ep.subject, "err", err)
		case a.Status >= 500 && a.Status != http.StatusServiceUnavailable:
			s.log.Error("command failed", "subject", ep.subject, "status", a.Status, "err", err)
		}
		s.accepts.failed.Add(1)
		if a.Status == http.StatusServiceUnavailable {
			a.RetryAfter = strconv.Itoa(int(RetryAfter / time.Second))
		}
	}
	if raw, ok := result.(json.RawMessage); ok {
		a.Body = raw // encoded already (an accepted operation)
		return a
	}
	a.Body, _ = json.Marshal(result)
	return a
}

// reply sends an answer on NATS: the body, the HTTP status in the Status
// header, micro's error headers (code = the HTTP status) on an error, and
// a 503's Retry-After. It publishes the reply itself rather than through
// req, which micro reads once its handler has returned.
func (s *Service) reply(req micro.Request, a commands.Answer) {
	if req.Reply() == "" {
		return
	}
	msg := nats.NewMsg(req.Reply())
	if a.Err != nil {
		msg.Header.Set(micro.ErrorCodeHeader, strconv.Itoa(a.Status))
		msg.Header.Set(micro.ErrorHeader, a.Err.Message)
	}
	if a.RetryAfter != "" {
		msg.Header.Set(commands.RetryAfterHeader, a.RetryAfter)
	}
	msg.Header.Set(commands.StatusHeader, strconv.Itoa(a.Status))
	msg.Data = a.Body
	if err := s.cfg.ServiceConn.PublishMsg(msg); err != nil {
		s.log.Warn("reply failed", "subject", req.Subject(), "err", err)
	}
}
