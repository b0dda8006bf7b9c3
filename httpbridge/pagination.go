package httpbridge

import (
	"net/http"
	"net/url"

	"github.com/volumed/volumed/commands"
)

// setNextPage announces the page after this one, if any: its cursor in
// commands.NextCursorHeader and its URL, the same query with ?cursor, in Link.
func setNextPage(w http.ResponseWriter, r *http.Request, next string) {
	if next == "" {
		return
	}
	q := r.URL.Query()
	q.Set("cursor", next)
	u := url.URL{Path: r.URL.Path, RawQuery: q.Encode()}
	w.Header().Set(commands.NextCursorHeader, next)
	w.Header().Set("Link", "<"+u.String()+`>; rel="next"`)
}
