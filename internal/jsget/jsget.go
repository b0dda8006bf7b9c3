// Package jsget reads a stream's messages where direct gets may be turned
// off while volumed runs.
package jsget

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Get returns get's message. When no server answered get as a direct get
// (an instance started with more replicas turned direct gets off since),
// it learns the stream's config and calls get once more, which then asks
// the leader.
func Get(ctx context.Context, s jetstream.Stream, get func() (*jetstream.RawStreamMsg, error)) (*jetstream.RawStreamMsg, error) {
	msg, err := get()
	if errors.Is(err, nats.ErrNoResponders) && s.CachedInfo().Config.AllowDirect {
		if _, ierr := s.Info(ctx); ierr == nil {
			msg, err = get()
		}
	}
	return msg, err
}

// Last returns the last message of subject (no wildcard) in s, through
// Get: when s allows direct gets, a direct get of the subject asked as
// the request's subject, with no body (the library encodes a JSON request
// it then does not send, a third of a read's cost), else the library's
// message get, which the leader answers. jetstream.ErrMsgNotFound when the
// subject has none.
func Last(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, subject string) (*jetstream.RawStreamMsg, error) {
	return Get(ctx, s, func() (*jetstream.RawStreamMsg, error) {
		info := s.CachedInfo()
		if !info.Config.AllowDirect {
			return s.GetLastMsgForSubject(ctx, subject)
		}
		rctx := ctx
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			rctx, cancel = context.WithTimeout(ctx, js.Options().DefaultTimeout)
			defer cancel()
		}
		reply, err := js.Conn().RequestWithContext(rctx, APIPrefix(js.Options())+"DIRECT.GET."+info.Config.Name+"."+subject, nil)
		if err != nil {
			return nil, err
		}
		return directMsg(reply)
	})
}

// directMsg is the message of a direct get's reply: its data, with its
// subject and sequence from the reply's headers (and the headers kept).
func directMsg(r *nats.Msg) (*jetstream.RawStreamMsg, error) {
	if st := r.Header.Get("Status"); st != "" && len(r.Data) == 0 {
		if st == "404" {
			return nil, jetstream.ErrMsgNotFound
		}
		desc := r.Header.Get("Description")
		if desc == "" {
			desc = "unable to get message"
		}
		return nil, fmt.Errorf("nats: direct get: %s %s", st, desc)
	}
	seq, err := strconv.ParseUint(r.Header.Get(jetstream.SequenceHeader), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("nats: direct get: sequence header: %w", err)
	}
	subj := r.Header.Get(jetstream.SubjectHeader)
	if subj == "" {
		return nil, errors.New("nats: direct get: no subject header")
	}
	return &jetstream.RawStreamMsg{Subject: subj, Sequence: seq, Header: r.Header, Data: r.Data}, nil
}

// APIPrefix is the subject prefix of the JetStream API requests of a
// client with options o.
func APIPrefix(o jetstream.JetStreamOptions) string {
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		return strings.TrimSuffix(o.APIPrefix, ".") + "."
	}
	return jetstream.DefaultAPIPrefix
}
