function(ctx) { identity: ctx.identity }
