package csapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/apache/cloudstack-go/v2/cloudstack"
)

// csErrorRE matches cloudstack-go's rendering of a CloudStack error answer.
var csErrorRE = regexp.MustCompile(`(?s)^CloudStack API error (\d+) \(CSExceptionErrorCode: (\d+)\): (.*)$`)

// textNoEntity is in CloudStack's 431 for a UUID parameter naming nothing.
const textNoEntity = "entity does not exist"

// classify turns a cloudstack-go call's error into an *Error. status is the
// last HTTP status the call received, 0 for none.
func classify(command string, err error, status int) *Error {
	e := &Error{Command: command, Text: err.Error(), Err: err}
	if m := csErrorRE.FindStringSubmatch(err.Error()); m != nil {
		e.Code, _ = strconv.Atoi(m[1])
		e.CSCode, _ = strconv.Atoi(m[2])
		e.Text = m[3]
		if e.Code == 0 {
			e.Code = status
		}
		e.Retryable = e.Code >= 500
		if notFound(e.Code, e.Text) {
			e.Err = ErrNotFound
		}
		return e
	}
	switch {
	case isTransport(err):
		e.Retryable = true
	case status >= 500: // an answer that is not CloudStack JSON, e.g. a proxy's 502
		e.Code, e.Retryable = status, true
	case status != 0 && status != http.StatusOK:
		e.Code = status
	}
	// Otherwise a 200 that cloudstack-go cannot parse: final.
	return e
}

// notFound reports a CloudStack error that says an id names nothing.
func notFound(code int, text string) bool {
	return code == 431 && strings.Contains(text, textNoEntity)
}

// isTransport reports an error of the connection rather than of an answer:
// refused, reset, EOF, timeouts and the call's context ending.
func isTransport(err error) bool {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// jobError is a failed job's final error, from its jobresult
// {errorcode, cserrorcode, errortext} or a text result.
func jobError(r *cloudstack.QueryAsyncJobResultResponse) *Error {
	e := &Error{Command: jobCommand(r.Cmd), Code: r.Jobresultcode}
	var res struct {
		Code   int    `json:"errorcode"`
		CSCode int    `json:"cserrorcode"`
		Text   string `json:"errortext"`
	}
	var text string
	switch {
	case json.Unmarshal(r.Jobresult, &res) == nil:
		if res.Code != 0 {
			e.Code = res.Code
		}
		e.CSCode, e.Text = res.CSCode, res.Text
	case json.Unmarshal(r.Jobresult, &text) == nil:
		e.Text = text
	default:
		e.Text = string(r.Jobresult)
	}
	if e.Text == "" {
		e.Text = "job " + r.JobID + " failed"
	}
	if notFound(e.Code, e.Text) {
		e.Err = ErrNotFound
	}
	return e
}

// jobCommand turns a job's cmd, e.g.
// "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd", into the
// API command "attachVolume".
func jobCommand(cmd string) string {
	name := cmd[strings.LastIndexByte(cmd, '.')+1:]
	name = strings.TrimSuffix(strings.TrimSuffix(name, "ByAdmin"), "Cmd")
	if name == "" {
		return "queryAsyncJobResult"
	}
	return strings.ToLower(name[:1]) + name[1:]
}
