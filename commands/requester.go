package commands

import "context"

type requesterKey struct{}

// WithRequester returns ctx carrying who asked for a command (the
// operation's requested_by): the edge that authenticated the caller sets
// it, acceptance records it.
func WithRequester(ctx context.Context, who string) context.Context {
	return context.WithValue(ctx, requesterKey{}, who)
}

// Requester is who WithRequester put on ctx, "" when no edge did.
func Requester(ctx context.Context) string {
	who, _ := ctx.Value(requesterKey{}).(string)
	return who
}
