package httpbridge

import (
	"net/http"
	"net/url"
)

// DefaultListLimit is the page size of GET /operations without ?limit.
const DefaultListLimit = 100

// NextCursorHeader carries the cursor of the next page of GET /operations;
// absent on the last page. Link (rel="next") carries the same page's URL.
const NextCursorHeader = "X-Next-Cursor"

// setNextPage announces the page after this one, if any: its cursor in
// NextCursorHeader and its URL, the same query with ?cursor, in Link.
func setNextPage(w http.ResponseWriter, r *http.Request, next string) {
	if next == "" {
		return
	}
	q := r.URL.Query()
	q.Set("cursor", next)
	u := url.URL{Path: r.URL.Path, RawQuery: q.Encode()}
	w.Header().Set(NextCursorHeader, next)
	w.Header().Set("Link", "<"+u.String()+`>; rel="next"`)
}
