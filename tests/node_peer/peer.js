'use strict';
// A rhea peer that behaves on the wire as skupper-proxy's bridges do
// (protocols.md §1 and §2), for the tests to put beside our own processes.
//
//   node peer.js tcp-egress   AMQP_PORT ADDRESS BACKEND_PORT
//   node peer.js tcp-ingress  AMQP_PORT ADDRESS
//   node peer.js http-egress  AMQP_PORT ADDRESS BACKEND_PORT
//   node peer.js http-ingress AMQP_PORT ADDRESS
//
// It connects to 127.0.0.1:AMQP_PORT; backends are on 127.0.0.1 too. What it
// does is printed as one JSON object a line on stdout, for the tests to wait on:
// {"listening": PORT}, {"route": STATUS}, {"consuming": ADDRESS}, {"attached": NAME}.
//
// Everything rhea does by default stays as it is, because that is what the
// node proxy sends: attach answers with null source and target, credit 1000,
// auto-accept, amqp-value bodies. The one change from the node proxy is that
// messages (and a detach) arriving before the backend is connected are kept
// for it, not dropped (protocols.md §7, "first bytes lost"), so the tests see
// the wire contract rather than that race.

const rhea = require('rhea');
const net = require('net');
const http = require('http');

const LOOPBACK = '127.0.0.1';
const LINK_ROUTE = 'org.apache.qpid.dispatch.router.connection.linkRoute';
const SITE = process.env.SKUPPER_SITE_ID;  // undefined under simple.js, and so "@undefined"

function report(event) {
    process.stdout.write(JSON.stringify(event) + '\n');
}

function connect(port, id) {
    const container = rhea.create_container({id: id, enable_sasl_external: true});
    // A test peer does not outlive its peer: no reconnect, and the process ends.
    return container.connect({host: LOOPBACK, port: port, reconnect: false});
}

function exitOnDisconnect(connection) {
    connection.on('disconnected', function (context) {
        report({disconnected: context.error ? String(context.error) : null});
        process.exit(3);
    });
}

// -- tcp-egress: AmqpToTcpBridge, protocols.md §1.1 --------------------------------
function tcpEgress(amqpPort, address, backendPort) {
    const connection = connect(amqpPort, `peer_amqp_${address}_to_tcp_${LOOPBACK}_${backendPort}`);
    exitOnDisconnect(connection);
    const management = connection.open_sender('$management');
    const replies = connection.open_receiver({source: {dynamic: true}});
    let sent = false;
    function createRoute() {
        if (sent || !replies.source || !replies.source.address || !management.sendable()) return;
        sent = true;
        management.send({
            reply_to: replies.source.address,
            correlation_id: 1,
            application_properties: {operation: 'CREATE', type: LINK_ROUTE, name: address},
            body: {pattern: address, direction: 'in'},
        });
    }
    management.on('sendable', createRoute);
    replies.on('receiver_open', createRoute);
    replies.on('message', function (context) {
        report({route: context.message.application_properties.statusCode});
    });
    connection.on('receiver_open', function (context) {
        const receiver = context.receiver;
        if (receiver === replies) return;
        report({attached: receiver.name});
        serve(receiver, backendPort);
    });
}

function serve(receiver, backendPort) {
    const early = [];
    let endedEarly = false;
    let socket = null;
    let sender = null;
    receiver.on('message', function (context) {
        const body = context.message.body;
        if (socket === null) early.push(body); else socket.write(body);
    });
    receiver.on('receiver_close', function () {
        if (socket) socket.end(); else endedEarly = true;
    });
    receiver.on('receiver_error', function () {});
    const backend = net.connect(backendPort, LOOPBACK);
    backend.pause();
    backend.on('connect', function () {
        socket = backend;
        sender = receiver.session.open_sender(receiver.source.address);
        sender.on('sendable', function () { socket.resume(); });
        sender.on('sender_close', function () { socket.end(); });
        sender.on('sender_error', function () {});
        socket.on('data', function (data) {
            sender.send({body: data});
            if (!sender.sendable()) socket.pause();
        });
        for (const body of early) socket.write(body);
        early.length = 0;
        if (endedEarly) socket.end();
    });
    function finish() {
        receiver.close();
        if (sender) sender.close();
    }
    backend.on('end', finish);
    backend.on('error', function () {
        if (socket === null) receiver.close(); else finish();
    });
}

// -- tcp-ingress: TcpToAmqpBridge and tunnel.Client, protocols.md §1.2 ---------------
function tcpIngress(amqpPort, address) {
    const server = net.createServer(function (socket) {
        socket.pause();
        const connection = connect(amqpPort, `peer_tcp_to_amqp_${address}`);
        const id = `${socket.remoteAddress}:${socket.remotePort}@${SITE}`;
        let replyTo = null;
        let sender = null;
        let ended = false;
        const receiver = connection.open_receiver({source: {dynamic: true}});
        function flowing() {
            if (sender !== null && replyTo !== null && sender.sendable()) socket.resume();
            else socket.pause();
        }
        function end() {
            if (ended) return;
            ended = true;
            socket.resume();
            socket.end();
            process.nextTick(function () { connection.close(); });
        }
        receiver.on('receiver_open', function () {
            replyTo = receiver.source.address;
            sender = connection.open_sender({name: id, target: {address: address},
                                             source: {address: replyTo}});
            sender.on('sendable', flowing);
            for (const event of ['released', 'rejected', 'modified', 'sender_close']) {
                sender.on(event, end);
            }
            sender.on('sender_error', function () {});
        });
        receiver.on('message', function (context) { socket.write(context.message.body); });
        receiver.on('receiver_close', end);
        receiver.on('receiver_error', function () {});
        connection.on('disconnected', end);
        socket.on('data', function (data) {
            sender.send({body: data, reply_to: replyTo});
            flowing();
        });
        socket.on('end', function () { connection.close(); });
        socket.on('error', function () { connection.close(); });
    });
    listen(server);
}

function listen(server) {
    server.listen(0, LOOPBACK, function () { report({listening: server.address().port}); });
}

// -- http-egress: AmqpToHttpBridge, protocols.md §2.2 --------------------------------
function httpEgress(amqpPort, address, backendPort) {
    const connection = connect(amqpPort, `peer_amqp_${address}_to_http_${backendPort}`);
    exitOnDisconnect(connection);
    const receiver = connection.open_receiver({source: address, autoaccept: false,
                                               credit_window: 10});
    receiver.on('receiver_open', function () { report({consuming: address}); });
    receiver.on('message', function (context) {
        const request = context.message;
        const headers = Object.assign({}, request.application_properties);
        if (request.content_type) headers['content-type'] = request.content_type;
        const path = new URL('http://' + request.to).pathname +
            (new URL('http://' + request.to).search || '');
        const outgoing = http.request({host: LOOPBACK, port: backendPort, method: request.subject,
                                       path: path, headers: headers}, function (response) {
            const chunks = [];
            response.on('data', function (chunk) { chunks.push(chunk); });
            response.on('end', function () {
                const props = Object.assign({}, response.headers);
                const contentType = props['content-type'];
                delete props['content-type'];
                connection.send({
                    to: request.reply_to,
                    correlation_id: request.correlation_id,
                    subject: String(response.statusCode),
                    application_properties: props,
                    content_type: contentType,
                    group_id: SITE,
                    body: Buffer.concat(chunks),
                });
                context.delivery.accept();
            });
        });
        outgoing.setTimeout(60000);
        outgoing.on('error', function () { context.delivery.modified(); });
        // Written, then ended: without a Content-Length header Node frames it chunked.
        if (request.body) outgoing.write(request.body);
        outgoing.end();
    });
}

// -- http-ingress: HttpToAmqpBridge and request.js, protocols.md §2.1 ----------------
function httpIngress(amqpPort, address) {
    const connection = connect(amqpPort, `peer_http_to_amqp_${address}`);
    exitOnDisconnect(connection);
    const sender = connection.open_sender(address);
    const replies = connection.open_receiver({source: {dynamic: true}});
    const pending = new Map();
    let counter = 0;
    replies.on('message', function (context) {
        const message = context.message;
        const answer = pending.get(message.correlation_id);
        if (answer === undefined) return;
        pending.delete(message.correlation_id);
        const headers = Object.assign({}, message.application_properties);
        if (message.content_type) headers['content-type'] = message.content_type;
        answer.writeHead(Number(message.subject) || 203, headers);
        answer.end(message.body);
    });
    const sendOutcomes = new Map();
    function send(message, answer, attempt) {
        const delivery = sender.send(message);
        sendOutcomes.set(delivery, {message: message, answer: answer, attempt: attempt});
    }
    function failed(context, why) {
        const entry = sendOutcomes.get(context.delivery);
        if (entry === undefined) return;
        sendOutcomes.delete(context.delivery);
        if (why === 'released' && entry.attempt < 10) {
            const delay = Math.min(50 * entry.attempt, 250);
            setTimeout(function () { send(entry.message, entry.answer, entry.attempt + 1); }, delay);
            return;
        }
        pending.delete(entry.message.correlation_id);
        entry.answer.writeHead(500);
        entry.answer.end(why);
    }
    sender.on('accepted', function (context) { sendOutcomes.delete(context.delivery); });
    sender.on('released', function (context) { failed(context, 'released'); });
    sender.on('rejected', function (context) { failed(context, 'rejected'); });
    const server = http.createServer(function (request, answer) {
        const chunks = [];
        request.on('data', function (chunk) { chunks.push(chunk); });
        request.on('end', function () {
            const props = Object.assign({}, request.headers);
            const contentType = props['content-type'];
            delete props['content-type'];
            const host = (request.headers.host || '').split(':')[0];
            const body = Buffer.concat(chunks);
            const message = {
                to: host + request.url,
                subject: request.method,
                content_type: contentType,
                application_properties: props,
                group_id: SITE,
                message_annotations: {},
                correlation_id: ++counter,
                reply_to: replies.source.address,
                body: body.length ? body : null,
            };
            pending.set(message.correlation_id, answer);
            send(message, answer, 0);
        });
    });
    replies.on('receiver_open', function () { listen(server); });
}

const modes = {
    'tcp-egress': tcpEgress,
    'tcp-ingress': tcpIngress,
    'http-egress': httpEgress,
    'http-ingress': httpIngress,
};
const [mode, ...args] = process.argv.slice(2);
if (!(mode in modes)) {
    process.stderr.write(`usage: node peer.js {${Object.keys(modes).join('|')}} AMQP_PORT ...\n`);
    process.exit(2);
}
modes[mode](Number(args[0]), args[1], Number(args[2]));
