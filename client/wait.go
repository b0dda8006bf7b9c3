package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"net/http"
	"net/url"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
)

// WaitSlice is how long one ?wait request of Wait asks the server to hold.
const WaitSlice = 30 * time.Second

// minWaitSlice is the shortest ?wait Wait asks for, and the pause after a
// non-terminal answer that came back early (a server shutting down).
const minWaitSlice = 100 * time.Millisecond

// ErrNoNATS reports Watch on a client made without WithNATS.
var ErrNoNATS = errors.New("client: Watch needs a NATS connection (WithNATS)")

// Wait returns the operation once it is terminal (completed, failed or
// cancelled), through GET /operations/{id}?wait in slices of WaitSlice,
// or ctx's error; a 503 (the store briefly unavailable) is asked again
// after its Retry-After. A failed operation is returned with a nil error: read
// Status, Error and Details.
func (c *Client) Wait(ctx context.Context, opID string) (commands.Operation, error) {
	return c.WaitProgress(ctx, opID, WaitSlice, nil)
}

// WaitProgress is Wait asking the server to hold each request for at most
// slice, calling progress (when not nil) with every record read, so a
// caller can show the operation's step as it moves.
func (c *Client) WaitProgress(ctx context.Context, opID string, slice time.Duration,
	progress func(commands.Operation)) (commands.Operation, error) {
	slice = max(slice, minWaitSlice)
	for {
		d := slice
		if dl, ok := ctx.Deadline(); ok {
			d = max(min(d, time.Until(dl)), minWaitSlice)
		}
		start := time.Now()
		var op commands.Operation
		_, err := c.do(ctx, http.MethodGet, "/operations/"+url.PathEscape(opID)+"?"+
			url.Values{"wait": {d.Round(time.Millisecond).String()}}.Encode(), nil, &op)
		var e *Error
		switch {
		case errors.As(err, &e) && e.Status == http.StatusServiceUnavailable:
			// A read, asked again: the store is briefly unavailable (a
			// cluster electing leaders after losing a node).
			select {
			case <-ctx.Done():
				return op, fmt.Errorf("%w (last answer: %w)", ctx.Err(), err)
			case <-time.After(max(e.RetryAfter, minWaitSlice)):
			}
			continue
		case err != nil:
			return op, err
		}
		if progress != nil {
			progress(op)
		}
		if op.Status.Terminal() {
			return op, nil
		}
		if time.Since(start) < d/10 {
			select {
			case <-ctx.Done():
				return op, ctx.Err()
			case <-time.After(minWaitSlice):
			}
		}
		if err := ctx.Err(); err != nil {
			return op, err
		}
	}
}

// Watch yields the operation's events from volumed's NATS bus, from its
// first (replayed from the JetStream stream that keeps volumes.ops.<id>)
// to its terminal one, then ends. When the stream keeps no event of the
// operation (it is older than the stream's retention), the stored record
// is yielded instead, and Watch ends if it is terminal. An error is
// yielded once, last: an unknown operation (*Error NOT_FOUND), a bus
// failure, an undecodable event or ctx's end.
func (c *Client) Watch(ctx context.Context, opID string) iter.Seq2[commands.Operation, error] {
	return func(yield func(commands.Operation, error) bool) {
		if c.nc == nil {
			yield(commands.Operation{}, ErrNoNATS)
			return
		}
		msgs, kept, err := c.subscribeOps(ctx, opID)
		if err != nil {
			yield(commands.Operation{}, err)
			return
		}
		defer msgs.Stop()
		if !kept {
			op, err := c.GetOperation(ctx, opID)
			if err != nil || !yield(op, nil) || op.Status.Terminal() {
				if err != nil {
					yield(op, err)
				}
				return
			}
		}
		for {
			msg, err := msgs.Next(jetstream.NextContext(ctx))
			if err != nil {
				if ctx.Err() != nil {
					err = ctx.Err()
				}
				yield(commands.Operation{}, fmt.Errorf("client: watch %s: %w", opID, err))
				return
			}
			var op commands.Operation
			if err := json.Unmarshal(msg.Data(), &op); err != nil {
				yield(op, fmt.Errorf("client: watch %s: decode event: %w", opID, err))
				return
			}
			if !yield(op, nil) || op.Status.Terminal() {
				return
			}
		}
	}
}

// subscribeOps opens an ordered consumer on the operation's event subject,
// delivering from the first event the stream kept, and says whether the
// stream kept any.
func (c *Client) subscribeOps(ctx context.Context, opID string) (jetstream.MessagesContext, bool, error) {
	js, err := jetstream.New(c.nc)
	if err != nil {
		return nil, false, fmt.Errorf("client: jetstream: %w", err)
	}
	subject := commands.OpSubject(opID)
	name, err := js.StreamNameBySubject(ctx, subject)
	if err != nil {
		return nil, false, fmt.Errorf("client: no stream keeps %s: %w", subject, err)
	}
	stream, err := js.Stream(ctx, name)
	if err != nil {
		return nil, false, fmt.Errorf("client: stream %s: %w", name, err)
	}
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subject}, DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		return nil, false, fmt.Errorf("client: consume %s: %w", subject, err)
	}
	msgs, err := cons.Messages()
	if err != nil {
		return nil, false, fmt.Errorf("client: consume %s: %w", subject, err)
	}
	// Asked after the consumer exists, so an event published in between is
	// delivered by it, never lost.
	_, err = stream.GetLastMsgForSubject(ctx, subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return msgs, false, nil
	case err != nil:
		msgs.Stop()
		return nil, false, fmt.Errorf("client: stream %s: %w", name, err)
	}
	return msgs, true, nil
}
