package microvm

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// qmp is a client of QEMU's machine protocol (QMP) on a unix socket: JSON
// objects, one per line. After the greeting and qmp_capabilities, the client
// sends {"execute", "arguments", "id"} and QEMU answers {"return"} or
// {"error"} with the same id; asynchronous {"event"} objects arrive in between.
//
// A qmp owns one reader goroutine, which Close stops. QEMU serves one QMP
// client per socket at a time, so the runtime dials for an operation and
// closes when done.
type qmp struct {
	conn net.Conn

	mu      sync.Mutex // guards the fields below and writes to conn
	nextID  int
	pending map[string]chan qmpReply
	subs    map[*qmpSub]struct{}
	err     error // set when the reader stops

	done chan struct{} // closed when the reader stops
}

// qmpReply is QEMU's answer to one command.
type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
}

// QMPError is an error QEMU returned for a command.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *QMPError) Error() string { return fmt.Sprintf("%s: %s", e.Class, e.Desc) }

// qmpEvent is an asynchronous event.
type qmpEvent struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

// qmpSub receives the events named name until it is cancelled.
type qmpSub struct {
	name string
	ch   chan qmpEvent
}

// dialQMP connects to QEMU's QMP socket, reads the greeting and leaves the
// capabilities negotiation mode, so commands can be executed.
func dialQMP(ctx context.Context, socket string) (*qmp, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	// The greeting is read before the reader starts: it has no id.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	r := bufio.NewReader(conn)
	line, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp %s: read greeting: %w", socket, err)
	}
	var greeting struct {
		QMP *json.RawMessage `json:"QMP"`
	}
	if err := json.Unmarshal(line, &greeting); err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp %s: greeting %q is not QMP's", socket, line)
	}
	conn.SetReadDeadline(time.Time{})
	q := &qmp{conn: conn, pending: map[string]chan qmpReply{}, subs: map[*qmpSub]struct{}{}, done: make(chan struct{})}
	go q.read(r)
	if err := q.execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// read dispatches QEMU's messages until the connection ends.
func (q *qmp) read(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		if line, err = r.ReadBytes('\n'); err != nil {
			break
		}
		var msg struct {
			qmpReply
			qmpEvent
			ID json.RawMessage `json:"id"`
		}
		if err = json.Unmarshal(line, &msg); err != nil {
			err = fmt.Errorf("qmp: undecodable message %q: %w", line, err)
			break
		}
		q.mu.Lock()
		if msg.Name != "" {
			for s := range q.subs {
				if s.name == msg.Name {
					select {
					case s.ch <- msg.qmpEvent:
					default: // a subscriber that does not keep up misses events, never blocks the reader
					}
				}
			}
		} else if ch, ok := q.pending[string(msg.ID)]; ok {
			delete(q.pending, string(msg.ID))
			ch <- msg.qmpReply
		}
		q.mu.Unlock()
	}
	q.mu.Lock()
	q.err = fmt.Errorf("qmp connection closed: %w", err)
	for id, ch := range q.pending {
		close(ch)
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.done)
}

// execute runs a QMP command; args (may be nil) becomes "arguments" and the
// "return" value is decoded into out (may be nil).
func (q *qmp) execute(ctx context.Context, command string, args, out any) error {
	q.mu.Lock()
	if q.err != nil {
		err := q.err
		q.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	q.nextID++
	id := strconv.Itoa(q.nextID)
	// The id is a JSON string; QEMU echoes it as sent.
	key := strconv.Quote(id)
	ch := make(chan qmpReply, 1)
	q.pending[key] = ch
	req := map[string]any{"execute": command, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err == nil {
		_, err = q.conn.Write(append(b, '\n'))
	}
	if err != nil {
		delete(q.pending, key)
		q.mu.Unlock()
		return fmt.Errorf("qmp %s: send: %w", command, err)
	}
	q.mu.Unlock()

	select {
	case reply, ok := <-ch:
		if !ok {
			q.mu.Lock()
			err := q.err
			q.mu.Unlock()
			return fmt.Errorf("qmp %s: %w", command, err)
		}
		if reply.Error != nil {
			return fmt.Errorf("qmp %s: %w", command, reply.Error)
		}
		if out != nil {
			if err := json.Unmarshal(reply.Return, out); err != nil {
				return fmt.Errorf("qmp %s: decode %s: %w", command, reply.Return, err)
			}
		}
		return nil
	case <-ctx.Done():
		q.mu.Lock()
		delete(q.pending, key)
		q.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

// subscribe delivers the events named name until cancel is called.
// Subscribe before the command that causes the event, or it may be missed.
func (q *qmp) subscribe(name string) (events <-chan qmpEvent, cancel func()) {
	s := &qmpSub{name: name, ch: make(chan qmpEvent, 16)}
	q.mu.Lock()
	q.subs[s] = struct{}{}
	q.mu.Unlock()
	return s.ch, func() {
		q.mu.Lock()
		delete(q.subs, s)
		q.mu.Unlock()
	}
}

// Close ends the connection and waits for the reader to stop.
func (q *qmp) Close() error {
	err := q.conn.Close()
	<-q.done
	return err
}
